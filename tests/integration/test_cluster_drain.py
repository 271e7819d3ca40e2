"""A spot reclaim with notice on a simulated cluster: Ray drains the node under a running job
with a 30 s deadline (reason preemption, as its autoscaler and `ray drain-node` send it). The
attempt checkpoints after its current step and ends preempted, with no retry charged; the job
resumes on the other node well before the deadline, nothing new is placed on the draining node,
and the final adapter is byte-identical to an uninterrupted run's."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from lorajobs.orchestrator.recovery import RetryPolicy
from lorajobs.orchestrator.scheduler import Policy
from lorajobs.orchestrator.settings import ControllerConfig
from lorajobs.orchestrator.states import JobStatus
from tests.plugins.cluster import (
    SimCluster,
    drive,
    reference_weights,
    start_controller,
    text_job,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

WEIGHTS = "adapter_model.safetensors"
CONFIG = ControllerConfig(
    poll_s=0.2,
    lease_s=10,
    policy=Policy(aging_s=0),
    # No infra retry at all: a drain that charged one would fail the job.
    retry=RetryPolicy(infra_retries=0, backoff_s=0.5),
)


def test_a_drained_node_s_job_checkpoints_and_resumes_elsewhere_before_the_deadline(
    sim_cluster: SimCluster, tmp_path: Path, tiny_text_model: Path, tiny_text_dataset: Path
) -> None:
    # No periodic checkpoints: the resume can only come from the one the drain asked for.
    def spec(name: str = "reclaimed", steps: int = 600):  # type: ignore[no-untyped-def]
        return text_job(name, tiny_text_model, tiny_text_dataset, steps=steps, checkpoint_every=0)

    reference = reference_weights(spec(), tmp_path)
    nodes = [sim_cluster.add_gpu_node("A100"), sim_cluster.add_gpu_node("A100")]
    queue, ctl = start_controller(sim_cluster, tmp_path / "home", CONFIG)
    bucket = tmp_path / "bucket"
    job = queue.submit(spec(), output_uri=f"file://{bucket}")[0]
    drive(ctl, lambda: (queue.get(job.id).step or 0) >= 30, timeout=180)

    (victim,) = [n for n in nodes if n.node_id == queue.get(job.id).node_id]
    (other,) = [n for n in nodes if n is not victim]
    deadline = sim_cluster.drain(victim, 30)
    # What a controller connected through the Ray client (ray://) reads, through its board.
    import ray

    drains = ray.get(ctl.backend.board.draining.remote(), timeout=30)
    assert abs(drains[victim.node_id].deadline_ms / 1000 - deadline) < 0.01
    # Submitted now, it takes the other node's free GPU; the reclaimed job, requeued, then waits
    # for it rather than take the victim's GPU, free but draining. (With no infra retries, an
    # attempt placed on the victim would fail the job: Ray refuses new tasks there.)
    late = queue.submit(spec("late", steps=5), output_uri=f"file://{bucket}")[0]
    moved: list[float] = []

    def note_the_move() -> None:
        if not moved and queue.get(job.id).attempt >= 2:
            moved.append(time.time())

    drive(ctl, lambda: queue.get(job.id).attempt >= 2, timeout=60, each=note_the_move)
    assert moved[0] < deadline, f"requeued {moved[0] - deadline:.1f} s after the deadline"
    print(f"drain -> requeued after {30 - (deadline - moved[0]):.1f} s (deadline 30 s)")
    ids = (job.id, late.id)
    drive(ctl, lambda: all(queue.get(j).status.is_terminal() for j in ids), timeout=240)
    done = queue.get(job.id)
    assert done.status is JobStatus.succeeded, done.failure_reason
    assert done.attempt == 2 and done.infra_retries == 0 and done.node_id == other.node_id
    finished_late = queue.get(late.id)
    assert finished_late.status is JobStatus.succeeded, finished_late.failure_reason
    assert finished_late.attempt == 1 and finished_late.node_id == other.node_id

    (preempted,) = [
        e
        for e in queue.events(job.id)
        if e.from_status is JobStatus.running and e.to_status is JobStatus.queued
    ]
    notice = f"preempted: node {victim.node_id[:12]} draining (spot reclaim), deadline "
    assert preempted.reason.startswith(f"attempt 1 {notice}"), preempted.reason
    print(preempted.reason)
    tail = " UTC; requeued (no retry charged)"
    assert preempted.reason.endswith(tail), preempted.reason
    assert preempted.data["kind"] == "infra" and preempted.data["node_id"] == victim.node_id
    assert done.failure_reason is not None and done.failure_reason.startswith(notice)

    # It resumed from the checkpoint the drain asked for, and changed no byte.
    resumed = done.result["metrics"]["resumed_from_step"]
    assert resumed >= 30, resumed
    assert done.result["files"][WEIGHTS] == reference
    stored = bucket / "adapters" / done.name / job.id / WEIGHTS
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == reference
