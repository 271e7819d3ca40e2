"""The `lorajobs` command line: one module per command group, registered here.

- `jobs`: submit, status, show, cancel, retry, priority, logs, controller, validate, schema
- `data`: data push, adapters, fetch
- `training`: run, reproduce, merge, export
- `demo`: demo, db upgrade, dev tiny-models
- `service`: server, admin token, login, logout (`remote` is the API client)
- `render`: tables and JSON; `context`: consoles, settings, the queue, spec loading

Data goes to stdout, messages to stderr. Exit codes: 0 ok, 1 a job or an operation failed,
2 bad input or a usage error (nothing was changed). The light commands never import torch or
Ray (`tests/e2e/test_light_imports.py`).
"""

from __future__ import annotations

import sys

import typer

from lorajobs.orchestrator.cli import data, demo, jobs, service, training

app = typer.Typer(
    name="lorajobs",
    help="Train many LoRA adapters: a queue, a scheduler on Ray, and reproducible workers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
for group in (jobs, data, training, demo, service):
    group.register(app)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one shared handler turns every error into one line and an exit code."""
    from lorajobs.jobspecs.failures import LoraJobsError

    try:
        # Without standalone mode click hands back `typer.Exit(code)` as a return value.
        rc = app(args=argv, prog_name="lorajobs", standalone_mode=False)
    except LoraJobsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as e:  # click's exceptions, vendored by typer since 0.2x
        sys.exit(_usage_error(e))
    sys.exit(rc if isinstance(rc, int) else 0)


def _usage_error(e: typer.TyperException) -> int:
    """Print a usage error as one line (plus a hint) and return its exit code (2)."""
    ctx = getattr(e, "ctx", None)
    if type(e).__name__ == "NoArgsIsHelpError":
        return 2  # `lorajobs data` alone: typer has printed the group's help already
    message = e.format_message() if hasattr(e, "format_message") else str(e)
    print(f"lorajobs: {message}", file=sys.stderr)
    if ctx is not None:
        print(f"Try '{ctx.command_path} --help' for help.", file=sys.stderr)
    return int(getattr(e, "exit_code", 2) or 2)
