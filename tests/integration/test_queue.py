"""The queue on a real database (SQLite file and PostgreSQL): rows, events, compare-and-set."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.exc import DBAPIError

from lorajobs.jobspecs import AnyJobSpec, parse_spec
from lorajobs.jobspecs.failures import FailureKind, InvalidInput, InvalidTransition, JobNotFound
from lorajobs.orchestrator.db import EVENTS, JOBS
from lorajobs.orchestrator.queue import JobRecord, Queue
from lorajobs.orchestrator.states import JobStatus

Q, D, R = JobStatus.queued, JobStatus.dispatched, JobStatus.running
S, F, C = JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled
OUT = "file:///srv/bucket"


def make_spec(name: str = "demo", **over: Any) -> AnyJobSpec:
    data: dict[str, Any] = {
        "kind": "text",
        "name": name,
        "base_model": "file:///models/tiny",
        "dataset": "file:///data/rows.jsonl",
        "training": {"steps": 10},
    }
    data.update(over)
    return parse_spec(data)


@pytest.fixture
def engine(any_db_engine: Engine) -> Engine:
    return any_db_engine


@pytest.fixture
def queue(engine: Engine) -> Queue:
    return Queue(engine)


def count(engine: Engine, table: Any, **where: Any) -> int:
    query = select(func.count()).select_from(table)
    for k, v in where.items():
        query = query.where(table.c[k] == v)
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def to_running(queue: Queue, job: JobRecord) -> JobRecord:
    queue.dispatch(job.id)
    return queue.transition(job.id, expected=D, to=R, reason="started", node="node-1")


# ---- submit -------------------------------------------------------------------------------


def test_submit_creates_the_row_and_one_event(queue: Queue, engine: Engine) -> None:
    spec = make_spec(
        "alpha", owner="ana", priority=5, resources={"gpus": 0.5, "cpus": 3, "gpu_type": "A100"}
    )
    job, created = queue.submit(spec, output_uri=OUT)
    assert created
    assert len(job.id) == 12 and all(c in "0123456789abcdef" for c in job.id)
    assert (job.name, job.kind, job.owner, job.priority) == ("alpha", "text", "ana", 5)
    assert (job.gpus, job.gpu_type, job.cpus) == (0.5, "A100", 3)
    assert job.status is Q and job.attempt == 1 and not job.cancel_requested
    assert job.output_uri == OUT and job.idempotency_key is None
    assert job.spec["training"]["steps"] == 10 and job.parsed_spec() == spec
    assert job.created_at.tzinfo is not None and job.created_at.utcoffset() == timedelta(0)
    assert abs(job.created_at - datetime.now(timezone.utc)) < timedelta(minutes=1)
    assert job.dispatched_at is job.started_at is job.finished_at is None
    assert queue.get(job.id) == job

    assert count(engine, JOBS) == 1
    [event] = queue.events(job.id)
    assert (event.from_status, event.to_status, event.reason) == (None, Q, "submitted")
    assert event.job_id == job.id and event.at == job.created_at


def test_same_idempotency_key_returns_the_same_job_and_writes_nothing(
    queue: Queue, engine: Engine
) -> None:
    first, created = queue.submit(make_spec(), output_uri=OUT, idempotency_key="k-1")
    again, created_again = queue.submit(make_spec(), output_uri=OUT, idempotency_key="k-1")
    assert created and not created_again
    assert again == first
    assert count(engine, JOBS) == 1 and count(engine, EVENTS) == 1
    other, created_other = queue.submit(make_spec(), output_uri=OUT, idempotency_key="k-2")
    assert created_other and other.id != first.id


def test_reusing_a_key_for_a_different_spec_is_refused(queue: Queue, engine: Engine) -> None:
    first, _ = queue.submit(make_spec(), output_uri=OUT, idempotency_key="k")
    with pytest.raises(InvalidInput, match=f"idempotency key 'k'.*{first.id}.*different spec"):
        queue.submit(make_spec(priority=3), output_uri=OUT, idempotency_key="k")
    with pytest.raises(InvalidInput, match="different spec"):
        queue.submit(make_spec(), output_uri="s3://elsewhere", idempotency_key="k")
    assert count(engine, JOBS) == 1 and count(engine, EVENTS) == 1


def test_submits_without_key_are_distinct(queue: Queue) -> None:
    ids = {queue.submit(make_spec(), output_uri=OUT)[0].id for _ in range(5)}
    assert len(ids) == 5


# ---- lookups ------------------------------------------------------------------------------


def _insert_with_id(engine: Engine, job_id: str) -> None:
    now = datetime.now(timezone.utc)
    with engine.begin() as conn:
        conn.execute(
            JOBS.insert().values(
                id=job_id,
                name="x",
                kind="text",
                owner="o",
                priority=0,
                status="queued",
                spec='{"kind":"text"}',
                output_uri=OUT,
                gpus=0.0,
                cpus=1,
                created_at=now,
                updated_at=now,
                attempt=1,
                cancel_requested=False,
            )
        )


def test_get_by_prefix(queue: Queue, engine: Engine) -> None:
    _insert_with_id(engine, "abcd00000001")
    _insert_with_id(engine, "abcd00000002")
    _insert_with_id(engine, "ffff00000000")
    assert queue.get("ffff").id == "ffff00000000"
    assert queue.get("FFFF0000").id == "ffff00000000"  # ids are shown lower-case; accept both
    assert queue.get("abcd00000002").id == "abcd00000002"
    with pytest.raises(InvalidInput, match="ambiguous.*abcd00000001, abcd00000002"):
        queue.get("abcd")
    with pytest.raises(InvalidInput, match="at least 4"):
        queue.get("fff")
    with pytest.raises(JobNotFound, match="no job '0123'"):
        queue.get("0123")
    with pytest.raises(JobNotFound, match="no job 'not-a-job'"):
        queue.get("not-a-job")
    with pytest.raises(JobNotFound):
        queue.events("000000000000")


def test_list_newest_first_with_filters(queue: Queue) -> None:
    t0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
    ticks = iter(t0 + timedelta(seconds=i) for i in range(100))
    q = Queue(queue.engine, clock=lambda: next(ticks))
    a, _ = q.submit(make_spec("a", owner="ana"), output_uri=OUT)
    b, _ = q.submit(make_spec("b", owner="bob"), output_uri=OUT)
    c, _ = q.submit(make_spec("c", owner="ana"), output_uri=OUT)
    q.dispatch(b.id)
    assert [j.id for j in q.list()] == [c.id, b.id, a.id]
    assert [j.id for j in q.list(owner="ana")] == [c.id, a.id]
    assert [j.id for j in q.list(statuses=[Q])] == [c.id, a.id]
    assert [j.id for j in q.list(statuses=[D, R])] == [b.id]
    assert q.list(statuses=[]) == []
    assert [j.id for j in q.list(limit=2)] == [c.id, b.id]


# ---- transitions --------------------------------------------------------------------------


def test_every_transition_appends_an_event_and_sets_its_timestamp(queue: Queue) -> None:
    t0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
    ticks = iter(t0 + timedelta(minutes=i) for i in range(100))
    q = Queue(queue.engine, clock=lambda: next(ticks))
    job, _ = q.submit(make_spec(), output_uri=OUT)
    d = q.dispatch(
        job.id,
        reason="dispatched by c1",
        lease_owner="c1",
        lease_expires_at=t0 + timedelta(hours=1),
    )
    assert d.status is D and d.dispatched_at == t0 + timedelta(minutes=1)
    assert d.lease_owner == "c1" and d.lease_expires_at == t0 + timedelta(hours=1)
    r = q.transition(job.id, expected=D, to=R, reason="training on n1", node="n1")
    assert r.started_at == t0 + timedelta(minutes=2) and r.node == "n1" and r.finished_at is None
    s = q.transition(
        job.id,
        expected=[D, R],
        to=S,
        reason="done",
        data={"adapter": "s3://b/a"},
        result={"ok": True, "loss": 0.5},
    )
    assert s.status is S and s.finished_at == t0 + timedelta(minutes=3)
    assert s.result == {"ok": True, "loss": 0.5}
    assert s.lease_owner is None and s.lease_expires_at is None  # released when it ends
    assert s.updated_at == s.finished_at

    events = q.events(job.id)
    assert [(e.from_status, e.to_status) for e in events] == [(None, Q), (Q, D), (D, R), (R, S)]
    assert [e.reason for e in events] == ["submitted", "dispatched by c1", "training on n1", "done"]
    assert events[-1].data == {"adapter": "s3://b/a"} and events[0].data is None
    assert [e.at for e in events] == [t0 + timedelta(minutes=i) for i in range(4)]
    assert [e.id for e in events] == sorted(e.id for e in events)


def test_wrong_expected_state_raises_and_writes_nothing(queue: Queue, engine: Engine) -> None:
    job, _ = queue.submit(make_spec(), output_uri=OUT)
    with pytest.raises(InvalidTransition, match=f"job {job.id} is queued, not running"):
        queue.transition(job.id, expected=R, to=S, reason="nope", result={"ok": True})
    with pytest.raises(InvalidTransition, match="dispatched/running"):
        queue.transition(job.id, expected=[D, R], to=F, reason="nope")
    assert queue.get(job.id) == job
    assert count(engine, EVENTS) == 1


def test_a_transition_outside_the_map_is_refused(queue: Queue, engine: Engine) -> None:
    job, _ = queue.submit(make_spec(), output_uri=OUT)
    with pytest.raises(InvalidTransition, match="queued -> running is not an allowed"):
        queue.transition(job.id, expected=Q, to=R, reason="skip dispatch")
    queue.transition(job.id, expected=Q, to=C, reason="cancelled")
    with pytest.raises(InvalidTransition):
        queue.transition(job.id, expected=C, to=R, reason="resurrect")
    assert count(engine, EVENTS) == 2
    assert queue.get(job.id).status is C


def test_only_a_winner_moves_the_job(queue: Queue) -> None:
    job, _ = queue.submit(make_spec(), output_uri=OUT)
    queue.dispatch(job.id)
    with pytest.raises(InvalidTransition, match="is dispatched, not queued"):
        queue.dispatch(job.id)
    assert [e.to_status for e in queue.events(job.id)] == [Q, D]


def test_status_and_unknown_fields_are_refused(queue: Queue) -> None:
    job, _ = queue.submit(make_spec(), output_uri=OUT)
    with pytest.raises(TypeError, match="status"):
        queue.transition(job.id, expected=Q, to=D, reason="x", status="running")
    with pytest.raises(TypeError, match="finished_at"):
        queue.transition(job.id, expected=Q, to=D, reason="x", finished_at=None)
    with pytest.raises(JobNotFound):
        queue.transition("000000000000", expected=Q, to=D, reason="x")
    assert queue.get(job.id).status is Q


def test_failure_retry_and_manual_retry(queue: Queue) -> None:
    job, _ = queue.submit(make_spec(), output_uri=OUT)
    to_running(queue, job)
    # An infra failure: back to the queue as attempt 2, resuming later.
    again = queue.transition(
        job.id,
        expected=R,
        to=Q,
        reason="node lost; retrying",
        attempt=2,
        failure_kind="infra",
        failure_reason="node lost",
    )
    assert again.status is Q and again.attempt == 2 and again.failure_kind is FailureKind.infra
    assert again.dispatched_at is None and again.started_at is None and again.finished_at is None
    to_running(queue, again)
    failed = queue.transition(
        job.id,
        expected=R,
        to=F,
        reason="user error: bad data",
        failure_kind=FailureKind.user,
        failure_reason="bad data",
    )
    assert failed.failure_kind is FailureKind.user and failed.finished_at is not None
    other = queue.submit(make_spec("other"), output_uri=OUT)[0]
    with pytest.raises(InvalidInput, match="only failed or cancelled jobs"):
        queue.retry(other.id)
    # A cancelled job keeps its checkpoints for a retry, so it can be retried too.
    queue.request_cancel(other.id)
    assert queue.retry(other.id).status is Q and queue.get(other.id).attempt == 2
    retried = queue.retry(job.id[:6])
    assert retried.status is Q and retried.attempt == 3
    assert retried.failure_kind is None and retried.finished_at is None
    assert [e.to_status for e in queue.events(job.id)] == [Q, D, R, Q, D, R, F, Q]


# ---- cancel, progress, claiming, leases ---------------------------------------------------


def test_cancel_a_queued_job_at_once(queue: Queue) -> None:
    job, _ = queue.submit(make_spec(), output_uri=OUT)
    done = queue.request_cancel(job.id[:5])
    assert done.status is C and done.finished_at is not None
    assert queue.events(job.id)[-1].reason == "cancelled by user"
    with pytest.raises(InvalidInput, match=f"job {job.id} is already cancelled"):
        queue.request_cancel(job.id)


@pytest.mark.parametrize("running", [False, True])
def test_cancel_an_active_job_only_flags_it(queue: Queue, running: bool) -> None:
    job, _ = queue.submit(make_spec(), output_uri=OUT)
    active = to_running(queue, job) if running else queue.dispatch(job.id)
    flagged = queue.request_cancel(job.id)
    assert flagged.cancel_requested and flagged.status is active.status
    assert len(queue.events(job.id)) == (3 if running else 2)  # no status change, no event
    assert queue.request_cancel(job.id).cancel_requested  # asking twice is harmless
    # The controller stops the task and records the end.
    end = queue.transition(job.id, expected=[D, R], to=C, reason="cancelled by user")
    assert end.status is C
    with pytest.raises(InvalidInput, match="already cancelled"):
        queue.request_cancel(job.id)


def test_cancel_a_finished_job_is_refused(queue: Queue) -> None:
    job, _ = queue.submit(make_spec(), output_uri=OUT)
    to_running(queue, job)
    queue.transition(job.id, expected=R, to=S, reason="done")
    with pytest.raises(InvalidInput, match=f"job {job.id} is already succeeded"):
        queue.request_cancel(job.id)


def test_progress_updates_only_active_jobs_and_writes_no_event(queue: Queue) -> None:
    job, _ = queue.submit(make_spec(), output_uri=OUT)
    assert not queue.record_progress(job.id, step=1, total_steps=10, loss=1.0, it_per_s=2.0)
    assert queue.get(job.id).step is None
    to_running(queue, job)
    assert queue.record_progress(job.id, step=4, total_steps=10, loss=0.25, it_per_s=3.5, node="n2")
    got = queue.get(job.id)
    assert (got.step, got.total_steps, got.loss, got.it_per_s, got.node) == (4, 10, 0.25, 3.5, "n2")
    assert got.status is R and len(queue.events(job.id)) == 3
    queue.transition(job.id, expected=R, to=S, reason="done")
    assert not queue.record_progress(job.id, step=9, total_steps=10, loss=0.1, it_per_s=1.0)
    assert queue.get(job.id).step == 4


def test_claim_order_is_priority_then_age(queue: Queue) -> None:
    t0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
    ticks = iter(t0 + timedelta(seconds=i) for i in range(100))
    q = Queue(queue.engine, clock=lambda: next(ticks))
    low_old, _ = q.submit(make_spec("low-old", priority=-1), output_uri=OUT)
    mid_old, _ = q.submit(make_spec("mid-old"), output_uri=OUT)
    high, _ = q.submit(make_spec("high", priority=10), output_uri=OUT)
    mid_new, _ = q.submit(make_spec("mid-new"), output_uri=OUT)
    taken, _ = q.submit(make_spec("taken", priority=50), output_uri=OUT)
    q.dispatch(taken.id)
    order = [high.id, mid_old.id, mid_new.id, low_old.id]
    assert [j.id for j in q.scheduling.claim_queued(10)] == order
    assert [j.id for j in q.scheduling.claim_queued(2)] == order[:2]
    # claim() hands the candidates to the scheduler and dispatches what it picks.
    got = q.scheduling.claim(
        10,
        choose=lambda jobs: [j for j in jobs if j.priority == 0],
        reason="dispatched by c1",
        lease_owner="c1",
    )
    assert [j.id for j in got] == [mid_old.id, mid_new.id]
    assert all(j.status is D and j.lease_owner == "c1" for j in got)
    assert [j.id for j in q.scheduling.claim_queued(10)] == [high.id, low_old.id]
    assert [j.id for j in q.scheduling.claim(1)] == [high.id]
    assert q.events(high.id)[-1].reason == "dispatched"


def test_renew_leases_only_for_the_owner(queue: Queue) -> None:
    t0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
    a, _ = queue.submit(make_spec("a"), output_uri=OUT)
    b, _ = queue.submit(make_spec("b"), output_uri=OUT)
    queue.dispatch(a.id, lease_owner="c1", lease_expires_at=t0)
    queue.dispatch(b.id, lease_owner="c2", lease_expires_at=t0)
    later = t0 + timedelta(minutes=5)
    assert queue.renew_leases("c1", [a.id, b.id], later) == 1
    assert queue.get(a.id).lease_expires_at == later
    assert queue.get(b.id).lease_expires_at == t0
    assert queue.renew_leases("c1", [], later) == 0


def test_timestamps_come_back_as_utc_whatever_zone_went_in(queue: Queue) -> None:
    plus2 = timezone(timedelta(hours=2))
    job, _ = queue.submit(make_spec(), output_uri=OUT)
    d = queue.dispatch(
        job.id, lease_owner="c", lease_expires_at=datetime(2030, 1, 1, 12, tzinfo=plus2)
    )
    assert d.lease_expires_at == datetime(2030, 1, 1, 10, tzinfo=timezone.utc)
    assert d.lease_expires_at.tzinfo == timezone.utc
    with pytest.raises(Exception, match="naive"):
        queue.renew_leases("c", [job.id], datetime(2030, 1, 1))


def test_the_database_refuses_unknown_statuses(engine: Engine) -> None:
    _insert_with_id(engine, "aaaa00000000")
    with pytest.raises(DBAPIError), engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET status = 'lost' WHERE id = 'aaaa00000000'"))
