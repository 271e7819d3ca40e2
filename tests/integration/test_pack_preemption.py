"""A pack stopped as a whole by a preemption notice (SIGTERM) ends as a preempted solo attempt
does: every member's outcome is classified by the same code (`attempt.guarded`), flagged
`preempted`, and the controller requeues each member with no retry charged, even with no infra
retries left; so does a pack on a draining node, asked to stop through its members. Real parts: the pack attempt trains the tiny Llama in this process (the Ray task's
body, `attempt_pack.run_pack`), on a real SQLite queue and a folder bucket; only Ray is scripted."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lorajobs.jobspecs import parse_spec
from lorajobs.jobspecs.failures import Preempted
from lorajobs.orchestrator import attempt as solo
from lorajobs.orchestrator.attempt_pack import run_pack
from lorajobs.orchestrator.drain import Drain
from lorajobs.orchestrator.queue import Queue
from lorajobs.orchestrator.ray_backend import Attempt
from lorajobs.orchestrator.recovery import RetryPolicy
from lorajobs.orchestrator.states import JobStatus
from lorajobs.storage.checkpoints import CheckpointStore
from tests.integration.test_controller_recovery import NODES, FakeRay, controller

pytestmark = pytest.mark.slow
NODE_ID = "n" * 56


class PackRay(FakeRay):
    """`FakeRay` that launches packs too, keeping what each pack's task would be given."""

    def __init__(self) -> None:
        super().__init__(nodes={"node-a": NODES["node-a"]})  # one slot: the second job packs
        self.packs: list[tuple[list[dict[str, Any]], str]] = []

    def launch_pack(
        self, members: list[dict[str, Any]], output_uri: str, *, shape: Any, node_id: str | None
    ) -> list[Attempt]:
        self.packs.append((members, output_uri))
        ids = tuple(m["job_id"] for m in members)
        ref = "pack:" + ",".join(ids)
        return [Attempt(m["job_id"], m["attempt"], ref, 0.0, node_id, pack=ids) for m in members]


def _spec(name: str, model: Path, data: Path, seed: int) -> Any:
    return parse_spec(
        {
            "kind": "text",
            "name": name,
            "base_model": str(model),
            "dataset": str(data),
            "lora": {"rank": 4, "alpha": 8},
            "training": {"steps": 30, "batch_size": 2, "seed": seed, "max_seq_length": 64},
            "resources": {"gpus": 1, "cpus": 1},
        }
    )


def _sigterm_after(calls: int) -> Any:
    """A pack's `cancelled` callback that sends this process SIGTERM on its `calls`-th call
    (it is asked once per member per round), as a spot reclaim or node shutdown would."""
    seen: list[str] = []

    def cancelled(job_id: str) -> bool:
        seen.append(job_id)
        if len(seen) == calls:
            os.kill(os.getpid(), signal.SIGTERM)
        return False

    return cancelled


@pytest.fixture
def queue(any_db_url: str) -> Iterator[Queue]:
    from lorajobs.orchestrator.db import ensure_schema, make_engine

    engine = make_engine(any_db_url)
    ensure_schema(engine, auto=True)
    yield Queue(engine)
    engine.dispose()


@pytest.fixture
def worker_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAJOBS_ALLOW_CPU_FALLBACK", "1")  # the logical GPU trains on the CPU
    monkeypatch.setenv("LORAJOBS_CACHE_DIR", str(tmp_path / "cache"))


def _packed(queue: Queue, ray: PackRay, c: Any, bucket: str, model: Path, data: Path) -> list[Any]:
    """Two jobs submitted together, launched as one pack on node-a (one slot)."""
    jobs = [queue.submit(_spec(f"pk-{i}", model, data, i), output_uri=bucket)[0] for i in range(2)]
    c.step()
    assert len(ray.packs) == 1, "the two jobs should share one attempt"
    assert {m["job_id"] for m in ray.packs[0][0]} == {j.id for j in jobs}
    return jobs


def _requeued_uncharged(queue: Queue, jobs: list[Any]) -> list[Any]:
    events = []
    for job in jobs:
        got = queue.get(job.id)
        assert got.status in (JobStatus.queued, JobStatus.dispatched), got.failure_reason
        assert got.attempt == 2 and got.infra_retries == 0
        (requeued,) = [e for e in queue.events(job.id) if e.to_status is JobStatus.queued][1:]
        assert "preempted" in requeued.reason and "(no retry charged)" in requeued.reason
        assert requeued.data["preempted"] is True
        events.append(requeued)
    return events


def test_a_sigterm_preempted_pack_requeues_every_member_uncharged(
    queue: Queue, worker_env: None, tmp_path: Path, tiny_text_model: Path, tiny_text_dataset: Path
) -> None:
    ray = PackRay()
    # No infra retry at all: a preemption that charged one would fail the job.
    c = controller(queue, ray, retry=RetryPolicy(infra_retries=0), packing="auto")
    bucket = f"file://{tmp_path / 'bucket'}"
    jobs = _packed(queue, ray, c, bucket, tiny_text_model, tiny_text_dataset)
    members, output_uri = ray.packs[0]

    # The pack's task, run here: SIGTERM after its third round.
    whole = run_pack(
        members, output_uri, send=lambda *_: None, cancelled=_sigterm_after(6), ray_node_id=NODE_ID
    )
    # Each member's outcome is what a solo attempt stopped the same way reports.
    like_solo = solo.failure(Preempted("x"), whole["node"], NODE_ID)
    for job in jobs:
        out = whole["jobs"][job.id]
        assert {k: out[k] for k in like_solo if k != "error"} == {
            k: v for k, v in like_solo.items() if k != "error"
        }
        assert "SIGTERM" in out["error"]
        assert CheckpointStore.for_job(bucket, job.id).latest() is not None  # its own checkpoint

    for job in jobs:
        ray.results[job.id] = whole  # each member's attempt shares the pack task's result
    c.step()
    _requeued_uncharged(queue, jobs)


def test_a_draining_node_stops_its_pack_which_is_requeued_uncharged(
    queue: Queue, worker_env: None, tmp_path: Path, tiny_text_model: Path, tiny_text_dataset: Path
) -> None:
    ray = PackRay()
    c = controller(queue, ray, retry=RetryPolicy(infra_retries=0), packing="auto")
    bucket = f"file://{tmp_path / 'bucket'}"
    jobs = _packed(queue, ray, c, bucket, tiny_text_model, tiny_text_dataset)
    members, output_uri = ray.packs[0]
    ray.drains = {"node-a": Drain("node-a", 1796405412000)}
    c.step()  # the controller asks each member's attempt to checkpoint and stop
    notice = Drain("node-a", 1796405412000).describe()
    assert sorted(ray.stops) == sorted((j.id, 1, notice) for j in jobs)

    # The pack's task, run here, sees the requests as its StopPolls would (after a few rounds).
    rounds = iter(range(1000))

    def stop_requested(job_id: str) -> str | None:
        asked = (job_id, 1, notice) in ray.stops
        return notice if asked and next(rounds) >= 4 else None

    whole = run_pack(
        members,
        output_uri,
        send=lambda *_: None,
        cancelled=lambda _: False,
        ray_node_id=NODE_ID,
        stop_requested=stop_requested,
    )
    for job in jobs:
        out = whole["jobs"][job.id]
        assert out["preempted"] is True and out["kind"] == "infra", out
        assert notice in out["error"]
        assert CheckpointStore.for_job(bucket, job.id).latest() is not None
        ray.results[job.id] = whole
    c.step()
    for requeued in _requeued_uncharged(queue, jobs):
        assert requeued.reason.startswith(f"attempt 1 {notice}"), requeued.reason
    # Nothing goes back to the draining node (the only one): both wait.
    assert all(queue.get(j.id).status is JobStatus.queued for j in jobs)
