"""CLI commands for cluster work; `register` adds them to the main `lorajobs` app.

`lorajobs retry JOB` queues a failed job again; `lorajobs priority JOB N` reprioritises a queued
one; `lorajobs logs JOB [-f]` prints (and follows)
the worker's log, which the worker streams to `<bucket>/jobs/<job_id>/logs/attempt-<N>.log`, so
it is readable from any machine that can read the bucket. Neither imports torch or Ray.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Optional

import typer

from lorajobs.jobspecs.failures import InvalidInput

FOLLOW_POLL_S = 1.0


def cost_estimate(job: Any) -> Any:
    """The cost estimate of a job record under this process's `LORAJOBS_PRICES`."""
    from lorajobs.orchestrator.cost import estimate, parse_prices

    prices = parse_prices(os.environ.get("LORAJOBS_PRICES"))
    return estimate(prices, gpus=job.gpus, gpu_type=job.gpu_type, cpus=job.cpus,
                    max_runtime_s=job.max_runtime_s)


def register(app: typer.Typer) -> None:
    """Add this module's commands to `app`."""

    @app.command()
    def retry(job: str = typer.Argument(..., help="Job id or a unique prefix.")) -> None:
        """Queue a failed job again as a new attempt; it resumes from its last checkpoint."""
        from lorajobs.orchestrator.cli import _queue, _settings, err

        rec = _queue(_settings()).retry(job)
        err.print(f"job {rec.id} queued again as attempt {rec.attempt}")
        print(rec.id)

    @app.command()
    def priority(
        job: str = typer.Argument(..., help="Job id or a unique prefix."),
        value: int = typer.Argument(..., help="New priority, -100..100; higher runs first."),
    ) -> None:
        """Change the priority of a job that is still queued."""
        from lorajobs.orchestrator.cli import _queue, _settings, err

        queue = _queue(_settings())
        before = queue.get(job)
        rec = queue.set_priority(before.id, value)
        err.print(f"job {rec.id}: priority {before.priority} -> {rec.priority}")
        print(rec.id)

    @app.command()
    def logs(
        job: str = typer.Argument(..., help="Job id or a unique prefix."),
        follow: bool = typer.Option(False, "-f", "--follow",
                                    help="Keep printing as the log grows, across attempts, "
                                    "until the job ends."),
        attempt: Optional[int] = typer.Option(None, "--attempt",
                                              help="This attempt's log (default: the latest)."),
    ) -> None:
        """Print the worker's log of a job (its latest attempt unless --attempt)."""
        from lorajobs.orchestrator.cli import _queue, _settings, err
        from lorajobs.storage.logs import read_log

        queue = _queue(_settings())
        rec = queue.get(job)
        if attempt is not None and not 1 <= attempt <= rec.attempt:
            raise InvalidInput(f"job {rec.id} has attempts 1-{rec.attempt}, not {attempt}")
        n = attempt or rec.attempt
        printed = 0

        def drain() -> None:
            nonlocal printed
            data = read_log(rec.output_uri, rec.id, n) or b""
            if len(data) > printed:
                sys.stdout.write(data[printed:].decode("utf-8", errors="replace"))
                sys.stdout.flush()
                printed = len(data)

        drain()
        if not follow:
            if printed == 0:
                err.print(f"job {rec.id}: no log for attempt {n} yet (it is {rec.status.value})")
            return
        try:
            while True:
                time.sleep(FOLLOW_POLL_S)
                now = queue.get(rec.id)
                drain()
                if attempt is None and now.attempt > n:
                    n, printed = now.attempt, 0  # the old attempt's log was final before this
                    err.print(f"--- attempt {n} ---")
                    continue
                if now.status.is_terminal():
                    drain()  # the worker uploads its log in full before the job can end
                    err.print(f"job {rec.id} {now.status.value}")
                    return
        except KeyboardInterrupt:
            return
