"""Every byte in the bucket: backends (`file://`, `s3://`), safe keys, parallel ranged
transfers, the node cache, staging, adapters, the checkpoint layout and attempt logs.

Imports no torch, no worker and no control plane (an import-linter contract checks it), so the
light CLI commands, the controller and the worker all reach the bucket through this one package.
"""
