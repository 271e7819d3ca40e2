"""Several processes and controllers on one database at once: nothing lost, nothing doubled.

Run on a SQLite file and on PostgreSQL. Workers are separate interpreters (spawn) or threads,
released together by a barrier so that their writes really overlap.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select

from lorajobs.jobspecs import parse_spec
from lorajobs.jobspecs.failures import InvalidTransition
from lorajobs.orchestrator.db import EVENTS, JOBS, ensure_schema, make_engine
from lorajobs.orchestrator.queue import Queue
from lorajobs.orchestrator.states import JobStatus

pytestmark = pytest.mark.timeout(300)

PROCS = 4
SUBMITS = 25
OUT = "file:///srv/bucket"


def _spec(name: str) -> Any:
    return parse_spec(
        {"kind": "image", "name": name, "base_model": "m", "dataset": "d", "training": {"steps": 5}}
    )


def _submitter(url: str, worker: int, barrier: Any, results: Any) -> None:
    """Submit SUBMITS jobs: even ones under keys every worker shares, odd ones unique."""
    engine = make_engine(url)
    queue = Queue(engine)
    out = []
    try:
        barrier.wait(timeout=60)
        for i in range(SUBMITS):
            if i % 2 == 0:
                job, created = queue.submit(
                    _spec(f"shared-{i}"), output_uri=OUT, idempotency_key=f"shared-{i}"
                )
            else:
                job, created = queue.submit(_spec(f"w{worker}-{i}"), output_uri=OUT)
            out.append((i, job.id, created))
        results.put((worker, out, None))
    except BaseException as err:  # report, so the parent fails with the cause
        results.put((worker, out, repr(err)))
    finally:
        engine.dispose()


def _dispatcher(url: str, name: str, barrier: Any) -> list[str]:
    """A naive controller: read candidates, try to dispatch each; losing a race is normal."""
    engine = make_engine(url)
    queue = Queue(engine)
    won: list[str] = []
    try:
        barrier.wait(timeout=60)
        while True:
            candidates = queue.scheduling.claim_queued(8)
            if not candidates:
                return won
            for job in candidates:
                try:
                    queue.dispatch(job.id, reason=f"dispatched by {name}", lease_owner=name)
                    won.append(job.id)
                except InvalidTransition:
                    pass
    finally:
        engine.dispose()


def _claimer(url: str, name: str, barrier: Any) -> list[str]:
    """A controller using the one-transaction claim."""
    engine = make_engine(url)
    queue = Queue(engine)
    won: list[str] = []
    try:
        barrier.wait(timeout=60)
        while True:
            got = queue.scheduling.claim(3, reason=f"dispatched by {name}", lease_owner=name)
            if not got and not queue.scheduling.claim_queued(1):
                return won
            won.extend(j.id for j in got)
    finally:
        engine.dispose()


def _proc_race(
    fn: Callable[..., list[str]], url: str, name: str, barrier: Any, results: Any
) -> None:
    try:
        results.put((name, fn(url, name, barrier), None))
    except BaseException as err:
        results.put((name, [], repr(err)))


def _counts(url: str) -> tuple[int, int]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            jobs = conn.execute(select(func.count()).select_from(JOBS)).scalar_one()
            events = conn.execute(select(func.count()).select_from(EVENTS)).scalar_one()
        return int(jobs), int(events)
    finally:
        engine.dispose()


def _prepared(url: str) -> Queue:
    engine = make_engine(url)
    ensure_schema(engine, auto=True)
    return Queue(engine)


@pytest.mark.slow
def test_concurrent_submits_lose_nothing_and_duplicate_nothing(any_db_url: str) -> None:
    queue = _prepared(any_db_url)
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(PROCS), ctx.Queue()
    procs = [
        ctx.Process(target=_submitter, args=(any_db_url, w, barrier, results)) for w in range(PROCS)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [err for _, _, err in outcomes if err] == []

    shared = [i for i in range(SUBMITS) if i % 2 == 0]
    unique_per_worker = SUBMITS - len(shared)
    expected_jobs = len(shared) + PROCS * unique_per_worker
    assert _counts(any_db_url) == (expected_jobs, expected_jobs)  # one submit event per job

    created = [c for _, out, _ in outcomes for _, _, c in out]
    assert sum(created) == expected_jobs
    for i in shared:
        ids = {job_id for _, out, _ in outcomes for j, job_id, _ in out if j == i}
        winners = [c for _, out, _ in outcomes for j, _, c in out if j == i and c]
        assert len(ids) == 1 and len(winners) == 1, f"key shared-{i}: {ids}, {winners}"
    jobs = queue.list()
    assert len(jobs) == expected_jobs
    assert Counter(j.idempotency_key for j in jobs if j.idempotency_key) == {
        f"shared-{i}": 1 for i in shared
    }
    assert all(j.status is JobStatus.queued for j in jobs)
    queue.engine.dispose()


def _race(fn: Callable[..., list[str]], url: str, how: str, n: int = 4) -> dict[str, list[str]]:
    if how == "threads":
        barrier = threading.Barrier(n)
        won: dict[str, list[str]] = {}
        errors: list[BaseException] = []

        def run(name: str) -> None:
            try:
                won[name] = fn(url, name, barrier)
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=run, args=(f"c{i}",)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=240)
        assert not errors, errors
        return won
    ctx = mp.get_context("spawn")
    pbarrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [
        ctx.Process(target=_proc_race, args=(fn, url, f"c{i}", pbarrier, results)) for i in range(n)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [err for _, _, err in outcomes if err] == []
    return {name: ids for name, ids, _ in outcomes}


@pytest.mark.slow
@pytest.mark.parametrize("how", ["threads", "processes"])
@pytest.mark.parametrize("fn", [_dispatcher, _claimer], ids=["cas-dispatch", "claim"])
def test_racing_controllers_dispatch_each_job_exactly_once(
    any_db_url: str, how: str, fn: Callable[..., list[str]]
) -> None:
    queue = _prepared(any_db_url)
    ids = {queue.submit(_spec(f"job-{i}"), output_uri=OUT)[0].id for i in range(40)}
    won = _race(fn, any_db_url, how)

    everything = [job_id for got in won.values() for job_id in got]
    assert sorted(everything) == sorted(ids)  # each job won by exactly one controller
    for name, got in won.items():
        for job_id in got:
            job = queue.get(job_id)
            assert job.status is JobStatus.dispatched and job.lease_owner == name
            assert [(e.from_status, e.to_status) for e in queue.events(job_id)] == [
                (None, JobStatus.queued),
                (JobStatus.queued, JobStatus.dispatched),
            ]
            assert queue.events(job_id)[-1].reason == f"dispatched by {name}"
    assert _counts(any_db_url) == (40, 80)
    queue.engine.dispose()


@pytest.mark.slow
def test_cancel_racing_dispatch_has_one_outcome(any_db_url: str) -> None:
    """A user cancelling while controllers dispatch: each job ends either cancelled (from
    queued) or dispatched and flagged — never both, never neither."""
    queue = _prepared(any_db_url)
    ids = [queue.submit(_spec(f"job-{i}"), output_uri=OUT)[0].id for i in range(30)]
    barrier = threading.Barrier(3)

    def cancel_all() -> None:
        barrier.wait(timeout=60)
        for job_id in ids:
            queue.request_cancel(job_id)

    threads = [threading.Thread(target=cancel_all)] + [
        threading.Thread(target=_dispatcher, args=(any_db_url, f"c{i}", barrier)) for i in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    for job_id in ids:
        job = queue.get(job_id)
        path = [e.to_status for e in queue.events(job_id)]
        if job.status is JobStatus.cancelled:
            assert path == [JobStatus.queued, JobStatus.cancelled] and not job.cancel_requested
        else:
            assert job.status is JobStatus.dispatched and job.cancel_requested
            assert path == [JobStatus.queued, JobStatus.dispatched]
    queue.engine.dispose()
