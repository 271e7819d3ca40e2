"""Shared test setup. Real services are started by the plugins below, on 127.0.0.1, by PID."""

import os

# Nothing may come from a model hub; Ray stays on loopback and reports nothing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = [
    "tests.plugins.postgres",
    "tests.plugins.seaweed",
    "tests.plugins.models",
    "tests.plugins.cluster",
]
