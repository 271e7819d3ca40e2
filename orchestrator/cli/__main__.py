"""`python -m lorajobs.orchestrator.cli`: the same as the `lorajobs` command."""

from lorajobs.orchestrator.cli import main

main()
