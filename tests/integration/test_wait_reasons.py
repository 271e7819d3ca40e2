"""The published wait reasons on SQLite and PostgreSQL: migration 0003, one row replaced per
write (also when two controllers write), read back by `status` / `show` in another process."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

from sqlalchemy import func, select

from lorajobs.jobspecs import parse_spec
from lorajobs.orchestrator.db import (
    SCHEDULER_STATE,
    SCHEMA_HEAD,
    current_revision,
    ensure_schema,
    make_engine,
)
from lorajobs.orchestrator.queue import Queue
from lorajobs.orchestrator.waiting import WaitSummary, reason
from tests.plugins.specs import spec_dict

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)


def test_published_reasons_replace_each_other_and_reach_a_queued_job(any_db_url: str) -> None:
    engine = make_engine(any_db_url)
    ensure_schema(engine, auto=True)
    assert current_revision(engine) == SCHEMA_HEAD
    queue = Queue(engine, clock=lambda: T0)
    assert queue.scheduling.waiting() is None

    job, _ = queue.submit(
        parse_spec(
            spec_dict(
                "text",
                "h",
                "m",
                "d",
                owner="carol",
                resources={"gpus": 1, "gpu_type": "H100", "cpus": 2},
            )
        ),
        output_uri="file:///b",
    )
    key = (0, "carol", 1.0, "H100", 2, None)
    first = WaitSummary(at=T0, stop=None, classes={key: "no node has 1 GPU H100, 2 CPU"})
    queue.scheduling.record_waiting(first)
    assert reason(job, queue.scheduling.waiting(), T0) == "no node has 1 GPU H100, 2 CPU"

    # Two controllers publishing at once: still one row, one of the two summaries.
    later = [WaitSummary(at=T0 + timedelta(seconds=i), stop=f"stop {i}") for i in (1, 2)]
    threads = [threading.Thread(target=queue.scheduling.record_waiting, args=(s,)) for s in later]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    got = queue.scheduling.waiting()
    assert got in later and got is not None
    assert reason(job, got, T0 + timedelta(seconds=3)) == got.stop
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(SCHEDULER_STATE)).scalar() == 1
    engine.dispose()
