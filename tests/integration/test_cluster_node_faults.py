"""Nodes that cannot run jobs, on a simulated cluster: a worker node without the bucket's
credentials, and a node whose GPU is not usable. Each fails its attempt as infra naming the
node, never as the user's fault and never by training on the CPU unannounced; the controller
keeps jobs off that node, and the retry succeeds on a good one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lorajobs.orchestrator.recovery import RetryPolicy
from lorajobs.orchestrator.scheduler import Policy
from lorajobs.orchestrator.settings import ControllerConfig
from lorajobs.orchestrator.states import JobStatus
from tests.plugins.cluster import SimCluster, drive, start_controller, text_job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

CONFIG = ControllerConfig(
    poll_s=0.2,
    lease_s=10,
    policy=Policy(aging_s=0),
    retry=RetryPolicy(infra_retries=2, backoff_s=0.5),
    node_fault_s=600,
)


def _fails_on_the_bad_node_then_succeeds(
    sim: SimCluster, home: Path, spec: Any, output_uri: str, bad: Any, needle: str
) -> None:
    queue, ctl = start_controller(sim, home, CONFIG)
    job = queue.submit(spec, output_uri=output_uri)[0]
    drive(ctl, until=lambda: queue.get(job.id).attempt >= 2, timeout=180)
    lost = [
        e
        for e in queue.events(job.id)
        if e.from_status is not None and e.to_status is JobStatus.queued
    ]
    assert len(lost) == 1, [e.reason for e in queue.events(job.id)]
    assert needle in lost[0].reason and bad.node_id[:12] in lost[0].reason, lost[0].reason
    assert lost[0].data["kind"] == "infra"
    # A good node joins; the bad one stays out of the rotation, so the retry lands on the good.
    good = sim.add_gpu_node("A100")
    drive(ctl, until=lambda: queue.get(job.id).status.is_terminal(), timeout=240)
    done = queue.get(job.id)
    assert done.status is JobStatus.succeeded, done.failure_reason
    assert done.attempt == 2 and done.node_id == good.node_id


def test_a_node_without_bucket_credentials_is_an_infra_fault_and_the_retry_runs_elsewhere(
    sim_cluster: SimCluster,
    s3_env: Any,
    tmp_path: Path,
    tiny_text_model: Path,
    tiny_text_dataset: Path,
) -> None:
    from lorajobs.storage.staging import stage_path

    model = stage_path(tiny_text_model, s3_env.uri, "model").uri
    data = stage_path(tiny_text_dataset, s3_env.uri, "dataset").uri
    bad = sim_cluster.add_gpu_node(
        "A100", env={"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}
    )
    spec = text_job("no-creds", model, data, steps=5)
    _fails_on_the_bad_node_then_succeeds(
        sim_cluster, tmp_path / "home", spec, s3_env.uri, bad, "has no credentials for the bucket"
    )


def test_a_gpu_job_on_a_node_without_a_usable_gpu_does_not_train_on_its_cpu(
    sim_cluster: SimCluster, tmp_path: Path, tiny_text_model: Path, tiny_text_dataset: Path
) -> None:
    bad = sim_cluster.add_gpu_node("A100", usable=False)
    spec = text_job("needs-gpu", tiny_text_model, tiny_text_dataset, steps=5)
    _fails_on_the_bad_node_then_succeeds(
        sim_cluster,
        tmp_path / "home",
        spec,
        (tmp_path / "bucket").as_uri(),
        bad,
        "no usable CUDA device",
    )
