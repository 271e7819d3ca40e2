"""One clock: every timestamp that orders or expires anything comes from the database server.

On PostgreSQL, a controller (or client) whose own clock is 60 s off neither takes over another
controller's running jobs nor loses its own, and a client whose clock is behind does not jump
the queue. "Off" here is the process's wall clock: `time.time` and `db.utcnow`, which every
local timestamp in lorajobs would come from, are moved while the database's clock is not."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest

from lorajobs.orchestrator import db
from lorajobs.orchestrator.db import ensure_schema, make_engine
from lorajobs.orchestrator.queue import Queue
from lorajobs.orchestrator.states import JobStatus
from tests.integration.test_controller_recovery import FakeRay, controller, spec

pytestmark = pytest.mark.slow


@pytest.fixture
def engine(pg_database: str) -> Iterator[Any]:
    engine = make_engine(pg_database)
    ensure_schema(engine, auto=True)
    yield engine
    engine.dispose()


class Skew:
    """Moves this process's wall clock by `seconds` (and back)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.mp = monkeypatch
        self.real_time, self.real_now = time.time, db.utcnow

    def __call__(self, seconds: float) -> None:
        real_time, real_now = self.real_time, self.real_now
        self.mp.setattr(time, "time", lambda: real_time() + seconds)
        self.mp.setattr(db, "utcnow", lambda: real_now() + timedelta(seconds=seconds))


@pytest.fixture
def skew(monkeypatch: pytest.MonkeyPatch) -> Skew:
    return Skew(monkeypatch)


def test_a_controller_ahead_by_60s_does_not_steal_running_jobs(engine: Any, skew: Skew) -> None:
    a_ray, b_ray = FakeRay(driver="session_a/01000000"), FakeRay(driver="session_b/01000000")
    a = controller(Queue(engine), a_ray)
    job, _ = a.queue.submit(spec("j"), output_uri="file:///tmp/unused")
    a.step()
    assert a.queue.get(job.id).status is JobStatus.dispatched
    skew(+60)
    b = controller(Queue(engine), b_ray)  # a new process on a machine 60 s ahead
    b.step()
    after = b.queue.get(job.id)
    assert after.status is JobStatus.dispatched and after.lease_owner == a.lease
    assert b_ray.launched == []


def test_a_controller_behind_by_60s_keeps_its_jobs(engine: Any, skew: Skew) -> None:
    skew(-60)
    b_ray = FakeRay(driver="session_b/01000000")
    b = controller(Queue(engine), b_ray)  # its leases must not be written already expired
    job, _ = b.queue.submit(spec("j"), output_uri="file:///tmp/unused")
    b.step()
    assert b.queue.get(job.id).lease_owner == b.lease
    skew(0)
    a_ray = FakeRay(driver="session_a/01000000")
    a = controller(Queue(engine), a_ray)
    a.step()
    after = a.queue.get(job.id)
    assert after.status is JobStatus.dispatched and after.lease_owner == b.lease
    assert a_ray.launched == []


def test_a_client_behind_does_not_jump_the_queue(engine: Any, skew: Skew) -> None:
    first, _ = Queue(engine).submit(spec("first"), output_uri="file:///tmp/unused")
    skew(-3600)
    second, _ = Queue(engine).submit(spec("second"), output_uri="file:///tmp/unused")
    assert second.created_at >= first.created_at
    queued = Queue(engine).list(statuses=[JobStatus.queued])
    assert [j.name for j in queued] == ["second", "first"]  # newest first, by the server's clock
    with engine.connect() as conn:
        from sqlalchemy import text

        server_now: datetime = conn.execute(text("SELECT now()")).scalar_one()
    assert abs((server_now - second.created_at).total_seconds()) < 30


def test_end_of_attempt_writes_check_the_lease(engine: Any) -> None:
    """A controller that lost a job's lease (taken over while it was still finishing) cannot
    record the end of its attempt: the write checks the lease it read."""
    from sqlalchemy import update

    from lorajobs.orchestrator.db import JOBS

    a = controller(Queue(engine), FakeRay(driver="session_a/01000000"))
    job, _ = a.queue.submit(spec("j"), output_uri="file:///tmp/unused")
    a.step()
    stale = a.queue.get(job.id)
    assert stale.lease_owner == a.lease
    with engine.begin() as conn:  # another controller takes it over meanwhile
        conn.execute(update(JOBS).where(JOBS.c.id == job.id).values(lease_owner="other-ctl x/01"))
    assert a._end(stale, JobStatus.failed, "late") is False
    after = a.queue.get(job.id)
    assert after.status is JobStatus.dispatched and after.lease_owner == "other-ctl x/01"
