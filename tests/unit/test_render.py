"""What the tables say about time."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

from lorajobs.orchestrator.cli.render import elapsed_s

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)


def test_elapsed_counts_from_dispatch_not_from_the_first_progress_report() -> None:
    """The node is held from dispatch: pulling the model and data is part of the job's time."""
    job = SimpleNamespace(
        dispatched_at=T0,
        started_at=T0 + timedelta(seconds=5),
        finished_at=T0 + timedelta(seconds=8),
    )
    assert elapsed_s(job) == 8.0  # type: ignore[arg-type]
    running = SimpleNamespace(dispatched_at=T0, started_at=None, finished_at=None)
    assert elapsed_s(running, now=T0 + timedelta(seconds=3)) == 3.0  # type: ignore[arg-type]
    queued = SimpleNamespace(dispatched_at=None, started_at=None, finished_at=None)
    assert elapsed_s(queued) is None  # type: ignore[arg-type]
