"""The queue's side of scheduling, on SQLite and PostgreSQL: the scheduling round (class heads,
backoff, bulk claims with events), demand for the autoscaler, lease-guarded transitions, and the
0001 -> 0002 migration keeping existing rows."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import Engine, text, update

from lorajobs.jobspecs import parse_spec
from lorajobs.jobspecs.failures import InvalidInput, InvalidTransition
from lorajobs.orchestrator.db import JOBS, current_revision, head_revision, make_engine, upgrade
from lorajobs.orchestrator.queue import Queue
from lorajobs.orchestrator.scheduler import Candidate, Hold, Placement, Shape
from lorajobs.orchestrator.states import JobStatus

OUT = "file:///srv/bucket"
Q, D = JobStatus.queued, JobStatus.dispatched


def spec(name: str, **over: Any) -> Any:
    data: dict[str, Any] = {
        "kind": "text",
        "name": name,
        "base_model": "m",
        "dataset": "d",
        "training": {"steps": 5},
    }
    data.update(over)
    return parse_spec(data)


@pytest.fixture
def engine(any_db_engine: Engine) -> Engine:
    return any_db_engine


def test_a_round_sees_class_heads_and_claims_in_one_go(engine: Engine) -> None:
    t0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
    ticks = iter(t0 + timedelta(seconds=i) for i in range(10_000))
    q = Queue(engine, clock=lambda: next(ticks))
    a = [q.submit(spec(f"a{i}", owner="acme"), output_uri=OUT)[0] for i in range(5)]
    h = [
        q.submit(spec(f"h{i}", resources={"gpus": 1, "gpu_type": "H100"}), output_uri=OUT)[0]
        for i in range(3)
    ]
    later = q.submit(spec("backoff", owner="zed"), output_uri=OUT)[0]
    with engine.begin() as conn:  # in backoff: not a candidate until then
        conn.execute(
            update(JOBS).where(JOBS.c.id == later.id).values(not_before=t0 + timedelta(days=1))
        )
    q.dispatch(a[0].id, lease_owner="other", node_id="n1")
    seen: dict[str, Any] = {"cands": []}

    class Planner:
        done = False

        def offer(self, cands: list[Candidate]) -> list[Placement]:
            seen["cands"] += cands
            return [
                Placement(c.id, "n2", "A100", data={"node_id": "n2"})
                for c in cands
                if c.gpu_type is None
            ]

    def start(holds: list[Hold]) -> Planner:
        seen["holds"] = holds
        return Planner()

    got = q.scheduling.schedule(
        start, per_class=2, aging_s=0, lease_owner="me", lease_expires_at=t0, page_size=3
    )
    # Two oldest per (priority, owner, shape) class; the dispatched one and the backoff one not.
    assert [c.id for c in seen["cands"]] and {c.id for c in seen["cands"]} == {
        a[1].id,
        a[2].id,
        h[0].id,
        h[1].id,
    }
    assert [(x.id, x.node_id) for x in seen["holds"]] == [(a[0].id, "n1")]
    assert {j.id for j in got} == {a[1].id, a[2].id}
    for j in got:
        assert (j.status, j.lease_owner, j.node_id, j.accelerator) == (D, "me", "n2", "A100")
        ev = q.events(j.id)[-1]
        assert (
            ev.to_status is D and ev.data == {"node_id": "n2"} and ev.reason == "dispatched by me"
        )
    # Pages came best first: effective priority, then age (h* are older than nothing here,
    # all priority 0: oldest first).
    assert [c.id for c in seen["cands"]] == [a[1].id, a[2].id, h[0].id, h[1].id]

    class Nothing:
        done = False

        def offer(self, cands: list[Candidate]) -> list[Placement]:
            return []

    class Bad(Nothing):
        def offer(self, cands: list[Candidate]) -> list[Placement]:
            return [Placement("nope", "n", None)]

    kw: dict[str, Any] = {"per_class": 2, "aging_s": 0, "lease_owner": "me", "lease_expires_at": t0}
    assert q.scheduling.schedule(lambda h: Nothing(), **kw) == []  # nothing chosen writes nothing
    with pytest.raises(ValueError):
        q.scheduling.schedule(lambda h: Bad(), **kw)


def test_pages_follow_effective_priority_with_aging(engine: Engine) -> None:
    t0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
    clock = [t0]
    q = Queue(engine, clock=lambda: clock[0])
    old_low = q.submit(spec("old-low", priority=0), output_uri=OUT)[0]
    clock[0] = t0 + timedelta(seconds=3000)
    new_high = q.submit(spec("new-high", priority=2, owner="b"), output_uri=OUT)[0]
    new_mid = q.submit(spec("new-mid", priority=1, owner="c"), output_uri=OUT)[0]
    got: list[str] = []

    class Take:
        done = False

        def offer(self, cands: list[Candidate]) -> list[Placement]:
            got.extend(c.id for c in cands)
            return []

    for aging_s, want in [(0, [new_high, new_mid, old_low]), (1000, [old_low, new_high, new_mid])]:
        got.clear()
        q.scheduling.schedule(
            lambda h: Take(),
            per_class=8,
            aging_s=aging_s,
            lease_owner="me",
            lease_expires_at=t0,
            page_size=1,
        )
        assert got == [j.id for j in want], aging_s


def test_demand_counts_shapes_of_queued_and_active_jobs(engine: Engine) -> None:
    q = Queue(engine)
    for i in range(3):
        q.submit(spec(f"q{i}", resources={"gpus": 0.5, "cpus": 2}), output_uri=OUT)
    j, _ = q.submit(spec("a", resources={"gpus": 1, "gpu_type": "A100"}), output_uri=OUT)
    q.dispatch(j.id)
    assert sorted(q.scheduling.demand(), key=lambda d: d[1]) == [
        (Shape(1.0, "A100", 1, None), False, 1),
        (Shape(0.5, None, 2, None), True, 3),
    ]
    assert q.scheduling.has_queued()


def test_lease_guarded_transition(engine: Engine) -> None:
    q = Queue(engine)
    j, _ = q.submit(spec("x"), output_uri=OUT)
    q.dispatch(j.id, lease_owner="c1")
    with pytest.raises(InvalidTransition, match="lease is held by c1, not c2"):
        q.transition(j.id, expected=D, to=Q, reason="take over", lease_owner_was="c2")
    back = q.transition(
        j.id,
        expected=D,
        to=Q,
        reason="take over",
        lease_owner_was="c1",
        attempt=2,
        node_id="ignored-on-requeue",
    )
    assert back.status is Q and back.lease_owner is None and back.attempt == 2


def test_upgrade_from_0001_keeps_rows(any_db_url: str) -> None:
    from alembic import command

    from lorajobs.orchestrator.db import _alembic_config, write_engine

    engine = make_engine(any_db_url)
    with write_engine(engine).connect() as conn, conn.begin():
        command.upgrade(_alembic_config(conn), "0001")
    assert current_revision(engine) == "0001"
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO jobs (id, name, kind, owner, priority, status, spec, output_uri, gpus, "
                "cpus, created_at, updated_at) VALUES ('aaaa00000001', 'old', 'text', 'o', 0, "
                "'queued', '{}', 'file:///b', 1.0, 1, '2030-01-01 00:00:00', '2030-01-01 00:00:00')"
            )
        )
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT name, infra_retries, user_retries, node_id, not_before FROM jobs")
        ).one()
    assert tuple(row) == ("old", 0, 0, None, None)
    engine.dispose()


def test_a_queued_job_can_be_reprioritised_until_it_is_dispatched(engine: Engine) -> None:
    q = Queue(engine)
    j, _ = q.submit(spec("p"), output_uri=OUT)
    got = q.set_priority(j.id[:6], 42)
    assert got.priority == 42 and got.spec["priority"] == 42 and got.status is Q
    assert got.parsed_spec().priority == 42
    ev = q.events(j.id)[-1]
    assert (ev.from_status, ev.to_status, ev.reason) == (Q, Q, "priority 0 -> 42")
    with pytest.raises(InvalidInput, match="between -100 and 100"):
        q.set_priority(j.id, 101)
    q.dispatch(j.id)
    with pytest.raises(InvalidInput, match="only queued jobs can be reprioritised"):
        q.set_priority(j.id, 1)


class _Recorder:
    """A planner that places nothing and remembers the order it was offered candidates in."""

    def __init__(self) -> None:
        self.offered: list[Candidate] = []

    @property
    def done(self) -> bool:
        return bool(self.offered)

    def offer(self, candidates: list[Candidate]) -> list[Placement]:
        self.offered += candidates
        return []


@pytest.mark.parametrize("aging_s", [0.0, 60.0, 600.0])
def test_the_database_reads_candidates_in_the_policys_own_order(
    engine: Engine, aging_s: float
) -> None:
    """Effective priority is written once (`scheduler.aged_priority`): the SQL that pages the
    candidates and the Python that ranks them must agree on the order, aging included."""
    from lorajobs.orchestrator.scheduler import ordered

    t0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
    stamps = iter([t0 + timedelta(seconds=97 * i) for i in range(24)])
    q = Queue(engine, clock=lambda: next(stamps))
    for i in range(24):  # priorities -2..3, owners and shapes vary, so classes differ
        q.submit(
            spec(
                f"j{i}",
                owner=f"o{i % 3}",
                priority=(i * 7) % 6 - 2,
                resources={"gpus": [0, 1, 0.5][i % 3], "cpus": 1 + i % 2},
            ),
            output_uri=OUT,
        )
    now = t0 + timedelta(hours=2)
    q.scheduling._clock = lambda: now
    recorder = _Recorder()
    q.scheduling.schedule(
        lambda holds: recorder,
        per_class=64,
        aging_s=aging_s,
        lease_owner="test",
        lease_expires_at=now,
    )
    assert len(recorder.offered) == 24
    assert [c.id for c in recorder.offered] == [
        c.id for c in ordered(recorder.offered, now, aging_s)
    ]
