"""Preemption by priority on a simulated Ray cluster, with real training.

One logical GPU. A low priority job trains; a high priority job arrives. The low one is asked
to stop only once it has run the minimum runtime (`LORAJOBS_MIN_RUNTIME_BEFORE_PREEMPT_S`, set
small here); its worker gets SIGTERM, checkpoints its step and ends as preempted; the job goes
back to the queue with the reason and who preempted it, no retry charged (its infra budget is
0: one charge would fail it); the high job runs; the low one resumes from its checkpoint. A
second high job arriving right after the resume must wait out the window again, so no job is
preempted twice within it. The low job's adapter is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from lorajobs.orchestrator import waiting
from lorajobs.orchestrator.cli import render
from lorajobs.orchestrator.recovery import RetryPolicy
from lorajobs.orchestrator.settings import ControllerConfig
from lorajobs.orchestrator.states import JobStatus
from tests.plugins.cluster import SimCluster, drive, start_controller, text_job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(500)]

WEIGHTS = "adapter_model.safetensors"
WINDOW_S = 4.0


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _reference(spec: Any, tmp: Path) -> str:
    """The adapter weights of an uninterrupted run of `spec`, trained here in-process."""
    from lorajobs.worker.context import WorkerContext
    from lorajobs.worker.entrypoint import run_job

    ctx = WorkerContext(
        job_id="reference",
        output_uri=f"file://{tmp / 'ref-bucket'}",
        cache_dir=tmp / "ref-cache",
        threads=spec.resources.cpus,
        cpu_fallback=True,
    )
    return str(run_job(spec, ctx)["files"][WEIGHTS])


def _utc(t: datetime | None) -> datetime | None:
    return t.replace(tzinfo=timezone.utc) if t is not None and t.tzinfo is None else t


def test_high_priority_preempts_after_min_runtime_and_low_resumes_identically(
    sim_cluster: SimCluster, tmp_path: Path, tiny_text_model: Path, tiny_text_dataset: Path
) -> None:
    config = ControllerConfig.from_env(
        {
            "LORAJOBS_MIN_RUNTIME_BEFORE_PREEMPT_S": str(WINDOW_S),
            "LORAJOBS_AGING_S": "0",
            "LORAJOBS_INFRA_RETRIES": "0",
        }
    )
    config = ControllerConfig(
        poll_s=0.2,
        lease_s=10,
        policy=config.policy,
        retry=RetryPolicy(infra_retries=0, backoff_s=0.5),
    )
    assert config.policy.min_runtime_s == WINDOW_S and config.policy.preempt_margin == 1

    def low_spec() -> Any:
        training = {"steps": 3000, "checkpoint_every": 1000}
        return text_job("low", tiny_text_model, tiny_text_dataset, priority=0, **training)

    reference = _reference(low_spec(), tmp_path)
    sim_cluster.add_gpu_node("A100")
    queue, ctl = start_controller(sim_cluster, tmp_path / "home", config)
    out = f"file://{tmp_path / 'bucket'}"
    low = queue.submit(low_spec(), output_uri=out)[0]

    def high(name: str) -> Any:
        spec = text_job(name, tiny_text_model, tiny_text_dataset, priority=5, steps=20)
        return queue.submit(spec, output_uri=out)[0]

    asked: list[tuple[datetime, datetime]] = []  # (attempt dispatched, asked to stop)
    said: dict[str, set[str]] = {"high": set(), "low": set()}  # what `status` said they wait for
    highs: list[Any] = []

    def watch() -> None:
        summary, now = queue.scheduling.waiting(), queue.clock()
        for key, job_id in (("low", low.id), *(("high", h.id) for h in highs)):
            said[key].add(waiting.reason(queue.get(job_id), summary, now) or "")
        j = queue.get(low.id)
        at, started = _utc(j.preempt_at), _utc(j.dispatched_at)
        if at is not None and started is not None and at >= started:
            if not asked or asked[-1][1] != at:
                asked.append((started, at))

    drive(ctl, lambda: (queue.get(low.id).step or 0) >= 5, timeout=180)
    first = high("high-1")
    highs.append(first)
    drive(ctl, lambda: queue.get(low.id).attempt == 2, timeout=120, each=watch)
    # It went back to the queue saying who preempted it, with no retry charged.
    back = [e for e in queue.events(low.id) if e.to_status is JobStatus.queued][-1]
    assert f"preempted by job {first.id} (priority 5)" in back.reason, back.reason
    assert "no retry charged" in back.reason and back.data["preempted"] is True
    assert queue.get(low.id).infra_retries == 0
    assert queue.get(low.id).preempted_by == first.id
    # `status`: the high job named its victim while it waited; the low one, who preempted it.
    assert any(f"preempting {low.id} (priority 0)" in r for r in said["high"]), said["high"]
    assert any(r.startswith(f"preempted by job {first.id}") for r in said["low"]), said["low"]
    lines = render.preemption_lines(queue.get(low.id), queue.events(low.id))
    assert lines and lines[0].startswith(f"preempted: attempt 1 by job {first.id}"), lines

    # Resumed (attempt 2 running): a second high job arrives at once.
    drive(
        ctl,
        lambda: queue.get(low.id).status is JobStatus.running and queue.get(low.id).attempt == 2,
        timeout=180,
        each=watch,
    )
    second = high("high-2")
    ids = [low.id, first.id, second.id]
    drive(ctl, lambda: all(queue.get(i).status.is_terminal() for i in ids), timeout=300, each=watch)
    for i in ids:
        assert queue.get(i).status is JobStatus.succeeded, queue.get(i).failure_reason

    done = queue.get(low.id)
    # Preempted once per high job, each only after the window in its attempt, never twice
    # within the window.
    assert len(asked) == 2 and done.attempt == 3 and done.infra_retries == 0
    for started, at in asked:
        assert (at - started).total_seconds() >= WINDOW_S
    assert (asked[1][1] - asked[0][1]).total_seconds() >= WINDOW_S
    reasons = [e.reason for e in queue.events(low.id) if e.to_status is JobStatus.queued]
    assert [f"job {first.id}" in r for r in reasons[-2:]] == [True, False]
    assert f"job {second.id}" in reasons[-1]
    # The high jobs ran while the low one was back in the queue.
    assert done.result["metrics"]["resumed_from_step"] > 0
    assert done.result["files"][WEIGHTS] == reference
    assert _sha(tmp_path / "bucket" / "adapters" / "low" / low.id / WEIGHTS) == reference
