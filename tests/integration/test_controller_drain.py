"""The controller and a draining node, on a real database with a scripted Ray (`FakeRay`):
the attempt there is asked to checkpoint and stop, its loss is requeued at once with no retry
charged even when the infra budget is spent, and nothing is placed on that node. The same on a
simulated Ray cluster, with real training: tests/integration/test_cluster_drain.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from lorajobs.orchestrator import views
from lorajobs.orchestrator.db import ensure_schema, make_engine
from lorajobs.orchestrator.drain import Drain
from lorajobs.orchestrator.queue import Queue
from lorajobs.orchestrator.recovery import RetryPolicy
from lorajobs.orchestrator.states import JobStatus
from tests.integration.test_controller_recovery import FakeRay, controller, spec

NOTICE = "preempted: node node-a draining (spot reclaim), deadline 2026-12-04 17:30:12 UTC"
STOPPED = f"stopped after step 7: {NOTICE} (checkpointed)"


@pytest.fixture
def queue(any_db_url: str) -> Iterator[Queue]:
    engine = make_engine(any_db_url)
    ensure_schema(engine, auto=True)
    yield Queue(engine)
    engine.dispose()


def _running_on_node_a(queue: Queue, ray: FakeRay, c: Any) -> str:
    job, _ = queue.submit(spec("spot"), output_uri="file:///tmp/unused")
    ray.nodes = {"node-a": ray.nodes["node-a"]}  # only node-a has room at first
    c.step()
    assert queue.get(job.id).node_id == "node-a"
    ray.reports[job.id] = {"attempt": 1, "step": 7, "total_steps": 10, "node": "host-a"}
    c.step()
    assert queue.get(job.id).status is JobStatus.running
    return job.id


def test_a_draining_node_s_attempt_is_stopped_and_requeued_uncharged(queue: Queue) -> None:
    ray = FakeRay()
    nodes = dict(ray.nodes)
    c = controller(queue, ray, retry=RetryPolicy(infra_retries=0, backoff_s=30.0))
    job_id = _running_on_node_a(queue, ray, c)
    ray.nodes = nodes
    c.step()
    assert ray.stops == []  # nothing drains: nobody is asked to stop

    ray.drains = {"node-a": Drain("node-a", 1796405412000)}
    c.step()
    c.step()
    # Asked each pass (a request to a restarting board may be lost), always with one notice.
    assert ray.stops == [(job_id, 1, NOTICE)] * 2
    assert queue.get(job_id).status is JobStatus.running  # it goes when it has checkpointed

    ray.results[job_id] = {"ok": False, "kind": "infra", "error": STOPPED, "node": "host-a"}
    c.step()  # recorded, requeued with no backoff, and placed at once: not on node-a
    got = queue.get(job_id)
    assert got.attempt == 2 and got.infra_retries == 0 and got.status is JobStatus.dispatched
    assert got.node_id == "node-b" and ray.launched[-1].node_id == "node-b"
    (requeued,) = [e for e in queue.events(job_id) if e.to_status is JobStatus.queued][1:]
    assert requeued.reason == f"attempt 1 {NOTICE}; requeued (no retry charged)"
    assert requeued.data["node_id"] == "node-a" and requeued.data["kind"] == "infra"
    assert got.failure_reason == NOTICE
    # `show`'s attempts table: the first attempt was preempted, on node-a.
    first = views.attempts(queue.events(job_id))[0]
    assert first["outcome"] == "preempted" and first["node_id"] == "node-a"
    assert first["reason"] == requeued.reason


def test_a_user_error_on_a_draining_node_is_still_the_user_s(queue: Queue) -> None:
    ray = FakeRay()
    c = controller(queue, ray)
    job_id = _running_on_node_a(queue, ray, c)
    ray.drains = {"node-a": Drain("node-a", 1796405412000)}
    c.step()
    ray.results[job_id] = {"ok": False, "kind": "user", "error": "dataset row 3 is empty"}
    c.step()
    got = queue.get(job_id)
    assert got.status is JobStatus.failed and got.failure_reason == "dataset row 3 is empty"


def test_a_node_lost_before_its_attempt_stopped_is_still_a_preemption(queue: Queue) -> None:
    ray = FakeRay()
    c = controller(queue, ray, retry=RetryPolicy(infra_retries=0))
    job_id = _running_on_node_a(queue, ray, c)
    ray.drains = {"node-a": Drain("node-a", 1796405412000)}
    c.step()
    ray.drains = {}  # the node is gone at its deadline, before the attempt stopped
    ray.results[job_id] = {
        "ok": False,
        "kind": "infra",
        "error": "NodeDiedError: gone",
        "node_lost": True,
    }
    c.step()
    got = queue.get(job_id)
    assert got.attempt == 2 and got.infra_retries == 0 and got.failure_reason == NOTICE


def test_an_attempt_refused_by_a_node_that_began_draining_is_not_charged(queue: Queue) -> None:
    ray = FakeRay()
    c = controller(queue, ray, retry=RetryPolicy(infra_retries=0))
    job, _ = queue.submit(spec("unlucky"), output_uri="file:///tmp/unused")
    ray.nodes = {"node-a": ray.nodes["node-a"]}
    c.step()  # placed on node-a; the drain comes before the task starts there
    ray.drains = {"node-a": Drain("node-a", 1796405412000)}
    ray.results[job.id] = {
        "ok": False,
        "kind": "infra",
        "error": "TaskUnschedulableError: the node specified ... doesn't exist any more",
        "node_lost": True,
    }
    c.step()
    got = queue.get(job.id)
    assert got.attempt == 2 and got.infra_retries == 0 and got.failure_reason == NOTICE


def test_a_pass_asks_ray_which_nodes_drain_once(queue: Queue) -> None:
    # One pass that needs the drains three times: to settle an attempt that ended (was its node
    # reclaimed?), to sweep the attempts in flight, and to place the queued jobs.
    ray = FakeRay()
    c = controller(queue, ray, retry=RetryPolicy(infra_retries=2, backoff_s=0.0))
    ended, running = (queue.submit(spec(n), output_uri="file:///tmp/unused")[0] for n in "ab")
    c.step()
    waiting = queue.submit(spec("c"), output_uri="file:///tmp/unused")[0]
    ray.drains = {"node-x": Drain("node-x", 1796405412000)}
    ray.results[ended.id] = {"ok": False, "kind": "infra", "error": "worker crashed"}
    ray.drain_reads = 0
    c.step()
    assert ray.drain_reads == 1
    assert queue.get(ended.id).attempt == 2 and queue.get(running.id).attempt == 1
    assert queue.get(waiting.id).status is JobStatus.queued  # no room: both GPUs in use
    c.step()
    assert ray.drain_reads == 2  # and again in the next pass: drains come and go
