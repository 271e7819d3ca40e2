"""Packs through the queue on a simulated cluster: text jobs on one base, submitted together,
share one attempt on one node; each adapter equals its solo run byte for byte; cancelling one
member or breaking its data ends that job alone; a lost node resumes every member from its
own checkpoint."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lorajobs.jobspecs import parse_spec
from lorajobs.orchestrator import views
from lorajobs.orchestrator.recovery import RetryPolicy
from lorajobs.orchestrator.scheduler import Policy
from lorajobs.orchestrator.settings import ControllerConfig
from lorajobs.orchestrator.states import JobStatus
from lorajobs.worker.context import WorkerContext
from lorajobs.worker.trainers import get_trainer
from tests.plugins.cluster import SimCluster, drive, start_controller

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CONFIG = ControllerConfig(
    poll_s=0.2,
    lease_s=10,
    policy=Policy(aging_s=0),
    retry=RetryPolicy(infra_retries=3, backoff_s=0.5),
    packing="auto",
)

VARIANTS: list[dict[str, Any]] = [
    {"lora": {"rank": 4, "alpha": 8}, "training": {"batch_size": 2, "seed": 1}},
    {"lora": {"rank": 8, "alpha": 16, "dropout": 0.1}, "training": {"batch_size": 3, "seed": 2}},
    {
        "lora": {"rank": 2, "alpha": 4, "target_modules": ["q_proj", "o_proj"]},
        "training": {"batch_size": 2, "gradient_accumulation_steps": 2, "seed": 3},
    },
    {"lora": {"rank": 4, "alpha": 4}, "training": {"batch_size": 4, "seed": 4}},
]


def _spec(i: int, model: Path, data: Path, steps: int, **training: Any) -> Any:
    v = VARIANTS[i]
    return parse_spec(
        {
            "kind": "text",
            "name": f"pk-{i}",
            "base_model": str(model),
            "dataset": str(data),
            "lora": v["lora"],
            "training": {
                "steps": steps,
                "learning_rate": 2e-3,
                "max_seq_length": 64,
                **v["training"],
                **training,
            },
            "resources": {"gpus": 1, "cpus": 1},
        }
    )


def _solo_weights(spec: Any, model: Path, data: Path, tmp: Path) -> bytes:
    out = tmp / f"solo-{spec.name}"
    ctx = WorkerContext(job_id="solo", output_uri=tmp.as_uri(), cache_dir=tmp / "c", threads=1)
    get_trainer("text")(spec, model, data, out, ctx)
    return (out / "adapter_model.safetensors").read_bytes()


def _adapter_weights(job: Any) -> bytes:
    uri = job.result["adapter_uri"]
    return (Path(uri.removeprefix("file://")) / "adapter_model.safetensors").read_bytes()


def _sidecar(job: Any) -> dict[str, Any]:
    uri = job.result["adapter_uri"]
    return json.loads((Path(uri.removeprefix("file://")) / "lorajobs.json").read_text())


def test_four_text_jobs_share_one_attempt_and_equal_their_solo_runs(
    sim_cluster: SimCluster, tmp_path: Path, tiny_text_model: Path, tiny_text_dataset: Path
) -> None:
    sim_cluster.add_gpu_node("A100")
    queue, ctl = start_controller(sim_cluster, tmp_path / "home", CONFIG)
    bucket = f"file://{tmp_path / 'bucket'}"
    specs = [_spec(i, tiny_text_model, tiny_text_dataset, steps=8 + 2 * i) for i in range(4)]
    jobs = [queue.submit(s, output_uri=bucket)[0] for s in specs]
    drive(ctl, until=lambda: all(queue.get(j.id).status.is_terminal() for j in jobs), timeout=300)
    done = [queue.get(j.id) for j in jobs]
    assert [j.status for j in done] == [JobStatus.succeeded] * 4, [j.failure_reason for j in done]
    # One attempt: the first job was placed, the other three joined it.
    lead = done[0]
    for j in done[1:]:
        assert j.pack_id == lead.id
        assert any(
            "packed into the attempt of job " + lead.id in e.reason for e in queue.events(j.id)
        )
        assert j.node_id == lead.node_id
    for j, spec in zip(done, specs):
        others = sorted(k.id for k in done if k.id != j.id)
        assert sorted(j.result["packed_with"]) == others
        assert sorted(_sidecar(j)["extra"]["pack"]["packed_with"]) == others
        assert (views.pack_text(j) or "").startswith("trained in one attempt with")
        assert _adapter_weights(j) == _solo_weights(
            spec, tiny_text_model, tiny_text_dataset, tmp_path
        ), j.name


def test_cancel_one_member_and_a_broken_dataset_end_those_jobs_alone(
    sim_cluster: SimCluster, tmp_path: Path, tiny_text_model: Path, tiny_text_dataset: Path
) -> None:
    sim_cluster.add_gpu_node("A100")
    queue, ctl = start_controller(sim_cluster, tmp_path / "home", CONFIG)
    bucket = f"file://{tmp_path / 'bucket'}"
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    specs = [
        _spec(0, tiny_text_model, tiny_text_dataset, steps=30),
        _spec(1, tiny_text_model, tiny_text_dataset, steps=5000),  # cancelled mid-pack
        _spec(2, tiny_text_model, broken, steps=30),
        _spec(3, tiny_text_model, tiny_text_dataset, steps=40),
    ]
    jobs = [queue.submit(s, output_uri=bucket)[0] for s in specs]
    cancelled = []

    def cancel_when_running() -> None:
        j = queue.get(jobs[1].id)
        if not cancelled and j.status is JobStatus.running and (j.step or 0) >= 3:
            queue.request_cancel(j.id)
            cancelled.append(j.step)

    drive(
        ctl,
        until=lambda: all(queue.get(j.id).status.is_terminal() for j in jobs),
        timeout=300,
        each=cancel_when_running,
    )
    done = [queue.get(j.id) for j in jobs]
    assert done[1].status is JobStatus.cancelled
    assert done[2].status is JobStatus.failed and done[2].failure_kind.value == "user"
    assert "broken.jsonl" in (done[2].failure_reason or "")
    for i in (0, 3):
        assert done[i].status is JobStatus.succeeded, done[i].failure_reason
        assert done[i].pack_id in (None, done[0].id)
        solo = _solo_weights(specs[i], tiny_text_model, tiny_text_dataset, tmp_path)
        assert _adapter_weights(done[i]) == solo


def test_a_lost_node_resumes_every_member_from_its_own_checkpoint(
    sim_cluster: SimCluster, tmp_path: Path, tiny_text_model: Path, tiny_text_dataset: Path
) -> None:
    first = sim_cluster.add_gpu_node("A100")
    queue, ctl = start_controller(sim_cluster, tmp_path / "home", CONFIG)
    bucket = f"file://{tmp_path / 'bucket'}"
    specs = [
        # The node goes at once when every member reached step 25: 500 steps leave the pack
        # most of its run to resume (1500 made this test half a minute longer: 74 s -> 43 s).
        _spec(i, tiny_text_model, tiny_text_dataset, steps=500, checkpoint_every=10)
        for i in range(3)
    ]
    jobs = [queue.submit(s, output_uri=bucket)[0] for s in specs]
    lost: list[bool] = []

    def lose_node_mid_pack() -> None:
        now = [queue.get(j.id) for j in jobs]
        if not lost and all(j.status is JobStatus.running and (j.step or 0) >= 25 for j in now):
            sim_cluster.remove(first)
            sim_cluster.add_gpu_node("A100", wait=False)
            lost.append(True)

    drive(
        ctl,
        until=lambda: all(queue.get(j.id).status.is_terminal() for j in jobs),
        timeout=500,
        each=lose_node_mid_pack,
    )
    assert lost
    done = [queue.get(j.id) for j in jobs]
    assert [j.status for j in done] == [JobStatus.succeeded] * 3, [j.failure_reason for j in done]
    assert done[1].pack_id == done[2].pack_id == done[0].id
    for j, spec in zip(done, specs):
        assert j.attempt == 2
        assert j.result["metrics"]["resumed_from_step"] >= 20, j.result["metrics"]
        solo = _solo_weights(spec, tiny_text_model, tiny_text_dataset, tmp_path)
        assert _adapter_weights(j) == solo, j.name


def test_a_preempted_or_drained_pack_requeues_its_members_uncharged(
    sim_cluster: SimCluster, tmp_path: Path, tiny_text_model: Path, tiny_text_dataset: Path
) -> None:
    # A pack is stopped as a whole twice: by SIGTERM (the preemption notice `RayBackend.preempt`
    # sends to any member's attempt), then by a drain of its node (a stop request its members
    # poll). Each time every member checkpoints and is requeued with no retry charged (there is
    # none to charge), and the final adapters equal the solo runs'.
    first = sim_cluster.add_gpu_node("A100")  # one slot: the second job packs in
    config = replace(CONFIG, retry=RetryPolicy(infra_retries=0, backoff_s=0.5))
    queue, ctl = start_controller(sim_cluster, tmp_path / "home", config)
    bucket = f"file://{tmp_path / 'bucket'}"
    specs = [
        _spec(i, tiny_text_model, tiny_text_dataset, steps=1500, checkpoint_every=0)
        for i in range(2)
    ]
    jobs = [queue.submit(s, output_uri=bucket)[0] for s in specs]
    done_to: dict[str, int] = {}  # what happened -> the step the leader had reached

    def running(attempt: int, step: int) -> bool:
        now = [queue.get(j.id) for j in jobs]
        return all(
            j.attempt == attempt and j.status is JobStatus.running and (j.step or 0) >= step
            for j in now
        )

    def stop_the_pack() -> None:
        if "sigterm" not in done_to and running(1, 20):
            assert ctl.backend.preempt(ctl.inflight[jobs[1].id])  # a member's attempt
            done_to["sigterm"] = queue.get(jobs[0].id).step or 0
        elif "drain" not in done_to and running(2, 40):
            assert queue.get(jobs[1].id).pack_id == jobs[0].id  # packed again
            sim_cluster.add_gpu_node("A100")  # where the pack goes next
            sim_cluster.drain(first, 60)
            done_to["drain"] = queue.get(jobs[0].id).step or 0

    drive(
        ctl,
        until=lambda: all(queue.get(j.id).status.is_terminal() for j in jobs),
        timeout=500,
        each=stop_the_pack,
    )
    done = [queue.get(j.id) for j in jobs]
    assert set(done_to) == {"sigterm", "drain"}, [
        (j.status, j.attempt, j.failure_reason) for j in done
    ]
    assert [j.status for j in done] == [JobStatus.succeeded] * 2, [j.failure_reason for j in done]
    assert done[1].pack_id == done[0].id and done[0].node_id != first.node_id
    for j, spec in zip(done, specs):
        assert j.attempt == 3 and j.infra_retries == 0, (j.attempt, j.infra_retries)
        requeued = [e for e in queue.events(j.id) if e.from_status is JobStatus.running]
        requeued = [e for e in requeued if e.to_status is JobStatus.queued]
        assert len(requeued) == 2 and all(e.data["preempted"] for e in requeued), requeued
        assert "draining (spot reclaim)" in requeued[1].reason
        assert j.result["metrics"]["resumed_from_step"] >= 40, j.result["metrics"]
        solo = _solo_weights(spec, tiny_text_model, tiny_text_dataset, tmp_path)
        assert _adapter_weights(j) == solo, j.name
