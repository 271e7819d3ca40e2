"""CLI commands for data work; `register` adds them to the main `lorajobs` app."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to `app`."""
