"""Stop notices under a multi-node gang, on a simulated cluster, with real training.

- A spot reclaim: Ray drains one of the gang's worker nodes (not the node its coordinating task
  runs on) with a 30 s deadline. The coordinator passes the notice to rank 0, the ranks agree
  on it at the same step, checkpoint together and end preempted, with no retry charged; the
  gang resumes on two other nodes before the deadline.
- A priority preemption: a high priority job that fits nowhere stops a running low priority
  gang once it has run the minimum runtime (SIGTERM to the coordinating task); the gang
  checkpoints, the high job runs, the gang resumes.

Either way the gang's final adapter is byte-identical to an uninterrupted gang's."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import pytest

from lorajobs.orchestrator.recovery import RetryPolicy
from lorajobs.orchestrator.scheduler import Policy
from lorajobs.orchestrator.settings import ControllerConfig
from lorajobs.orchestrator.states import JobStatus
from tests.plugins.cluster import SimCluster, drive, start_controller
from tests.plugins.ranks import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(500)]

WEIGHTS = "adapter_model.safetensors"
STEPS = 600
CONFIG = ControllerConfig(
    poll_s=0.2,
    lease_s=10,
    policy=Policy(aging_s=0),
    retry=RetryPolicy(infra_retries=0, backoff_s=0.5),  # a charged drain would fail the job
)


def _spec(model: Path, data: Path, priority: int = 0) -> dict[str, Any]:
    return {
        "kind": "text",
        "name": "stopped-gang",
        "priority": priority,
        "base_model": str(model),
        "dataset": str(data),
        "lora": {"rank": 4, "alpha": 8},
        "training": {
            "steps": STEPS,
            "batch_size": 2,
            "learning_rate": 1e-3,
            "seed": 0,
            "max_seq_length": 64,
            "checkpoint_every": 0,  # the resume can only come from the drain's checkpoint
        },
        "resources": {"nodes": 2, "gpus_per_node": 1, "gpu_type": "A100", "cpus": 1},
    }


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory, tiny_text_model: Path, tiny_text_dataset: Path
) -> str:
    """The sha256 of an uninterrupted 2-worker gang's adapter (spawned ranks, no Ray)."""
    tmp = tmp_path_factory.mktemp("gang-reference")
    raw = _spec(tiny_text_model, tiny_text_dataset)
    ref = run_ranks(tmp, "ref", 2, raw, bucket=tmp / "bucket", job_id="ref")
    return str(ref[0]["files"][WEIGHTS])


def test_a_drained_gang_node_checkpoints_the_whole_gang_and_it_resumes_elsewhere(
    sim_cluster: SimCluster,
    tmp_path: Path,
    tiny_text_model: Path,
    tiny_text_dataset: Path,
    reference: str,
) -> None:
    from lorajobs.jobspecs import parse_spec

    raw = _spec(tiny_text_model, tiny_text_dataset)

    nodes = [sim_cluster.add_gpu_node("A100") for _ in range(3)]
    queue, ctl = start_controller(sim_cluster, tmp_path / "home", CONFIG)
    bucket = tmp_path / "bucket"
    job = queue.submit(parse_spec(raw), output_uri=f"file://{bucket}")[0]
    drive(ctl, lambda: (queue.get(job.id).step or 0) >= 30, timeout=240)

    first = queue.get(job.id)
    gang = (first.gang_nodes or "").split(",")
    assert len(gang) == 2 and first.node_id in gang
    # The gang's other node: its workers run there, its coordinating task does not.
    (victim,) = [n for n in nodes if n.node_id in gang and n.node_id != first.node_id]
    deadline = sim_cluster.drain(victim, 30)
    moved: list[float] = []

    def note_the_move() -> None:
        if not moved and queue.get(job.id).attempt >= 2:
            moved.append(time.time())

    drive(ctl, lambda: queue.get(job.id).attempt >= 2, timeout=60, each=note_the_move)
    assert moved[0] < deadline, f"requeued {moved[0] - deadline:.1f} s after the deadline"
    drive(ctl, lambda: queue.get(job.id).status.is_terminal(), timeout=300)
    done = queue.get(job.id)
    assert done.status is JobStatus.succeeded, done.failure_reason
    assert done.attempt == 2 and done.infra_retries == 0
    assert victim.node_id not in (done.gang_nodes or "")  # never back on the draining node
    (preempted,) = [
        e
        for e in queue.events(job.id)
        if e.from_status is JobStatus.running and e.to_status is JobStatus.queued
    ]
    assert f"node {victim.node_id[:12]} draining (spot reclaim)" in preempted.reason
    assert preempted.reason.endswith("requeued (no retry charged)"), preempted.reason

    # Resumed from the checkpoint the ranks took together; not a byte changed.
    assert done.result["metrics"]["resumed_from_step"] >= 30
    stored = bucket / "adapters" / done.name / job.id / WEIGHTS
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == reference


def test_a_high_priority_job_preempts_a_running_gang_which_resumes_identically(
    sim_cluster: SimCluster,
    tmp_path: Path,
    tiny_text_model: Path,
    tiny_text_dataset: Path,
    reference: str,
) -> None:
    from lorajobs.jobspecs import parse_spec
    from tests.plugins.cluster import text_job

    raw = _spec(tiny_text_model, tiny_text_dataset)

    config = ControllerConfig(
        poll_s=0.2,
        lease_s=10,
        policy=Policy(aging_s=0, preempt_margin=1, min_runtime_s=3.0),
        retry=RetryPolicy(infra_retries=0, backoff_s=0.5),
    )
    for _ in range(2):
        sim_cluster.add_gpu_node("A100")
    queue, ctl = start_controller(sim_cluster, tmp_path / "home", config)
    bucket = tmp_path / "bucket"
    low = queue.submit(parse_spec(raw), output_uri=f"file://{bucket}")[0]
    drive(ctl, lambda: (queue.get(low.id).step or 0) >= 30, timeout=240)
    urgent = text_job("urgent", tiny_text_model, tiny_text_dataset, priority=5, steps=10)
    high = queue.submit(urgent, output_uri=f"file://{bucket}")[0]
    drive(ctl, lambda: queue.get(high.id).status.is_terminal(), timeout=240)
    assert queue.get(high.id).status is JobStatus.succeeded
    assert queue.get(low.id).preempted_by == high.id
    drive(ctl, lambda: queue.get(low.id).status.is_terminal(), timeout=300)
    done = queue.get(low.id)
    assert done.status is JobStatus.succeeded, done.failure_reason
    assert done.attempt == 2 and done.infra_retries == 0
    assert done.result["metrics"]["resumed_from_step"] >= 30
    stored = bucket / "adapters" / done.name / low.id / WEIGHTS
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == reference
