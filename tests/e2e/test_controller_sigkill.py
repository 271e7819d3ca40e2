"""The controller SIGKILLed mid-run three times and restarted, as a real `lorajobs controller`
process against a simulated multi-node Ray cluster and a shared SQLite database: every job ends
`succeeded` exactly once, no adapter is written twice, and the adapters are byte-identical."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lorajobs.orchestrator.db import make_engine
from lorajobs.orchestrator.queue import Queue
from lorajobs.orchestrator.states import JobStatus
from lorajobs.storage.logs import read_log
from tests.e2e.cli import CLI, write_spec
from tests.plugins.cluster import SimCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _wait(what: str, cond: Callable[[], bool], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise AssertionError(f"timed out waiting for {what}\n{tail}")
        time.sleep(0.1)


def test_controller_killed_three_times_every_job_succeeds_exactly_once(
    sim_cluster: SimCluster, tmp_path: Path, tiny_text_model: Path, tiny_text_dataset: Path
) -> None:
    for _ in range(2):
        sim_cluster.add_gpu_node("A100")
    home = tmp_path / "home"
    cli = CLI(
        home=home,
        env={
            "LORAJOBS_RAY_ADDRESS": sim_cluster.address,
            "LORAJOBS_LEASE_S": "5",
            "LORAJOBS_POLL_S": "0.2",
            "LORAJOBS_RETRY_BACKOFF_S": "0.2",
        },
    )
    names = ["survivor"] * 4  # one name: the adapter metadata carries it, so bytes compare
    specs = [
        write_spec(
            tmp_path / f"s{i}.yaml",
            "text",
            n,
            str(tiny_text_model),
            str(tiny_text_dataset),
            resources={"gpus": 1, "cpus": 1},
            training={"steps": 500, "checkpoint_every": 50},
        )
        for i, n in enumerate(names)
    ]
    r = cli("submit", *map(str, specs))
    assert r.code == 0, r.err
    ids = r.out.split()
    queue = Queue(make_engine(f"sqlite:///{home / 'lorajobs.db'}"))

    def jobs() -> list:
        return [queue.get(i) for i in ids]

    def mid_training() -> bool:
        return any(j.status is JobStatus.running and (j.step or 0) >= 30 for j in jobs())

    def one_done_one_running() -> bool:
        js = jobs()
        return any(j.status is JobStatus.succeeded for j in js) and any(
            j.status is JobStatus.running for j in js
        )

    def just_dispatched() -> bool:
        return any(j.status is JobStatus.dispatched for j in jobs())

    kills = []
    for n, trigger in enumerate([mid_training, one_done_one_running, just_dispatched]):
        log = tmp_path / f"controller-{n}.log"
        proc = cli.popen("controller", log=log)
        try:
            _wait(trigger.__name__, trigger, 240, log)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        kills.append({j.id: (j.status.value, j.attempt) for j in jobs()})

    log = tmp_path / "controller-final.log"
    proc = cli.popen("controller", log=log)
    try:
        _wait("every job to end", lambda: all(j.status.is_terminal() for j in jobs()), 300, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()

    final = jobs()
    assert [j.status for j in final] == [JobStatus.succeeded] * 4, [
        (j.status.value, j.failure_reason) for j in final
    ]
    bucket = home / "bucket"
    shas = set()
    for j in final:
        events = queue.events(j.id)
        assert [e.to_status for e in events].count(JobStatus.succeeded) == 1
        # Every attempt's log is in the bucket; exactly one of them uploaded the adapter.
        logs = [read_log(bucket.as_uri(), j.id, n) or b"" for n in range(1, j.attempt + 1)]
        uploads = sum(log.count(b"adapter uploaded to") for log in logs)
        assert uploads == 1, (j.id, j.attempt)
        weights = bucket / "adapters" / j.name / j.id / "adapter_model.safetensors"
        shas.add(hashlib.sha256(weights.read_bytes()).hexdigest())
        assert j.result["files"]["adapter_model.safetensors"] in shas
    assert len(shas) == 1, "same spec, same bytes, however often the controller died"
    lost = [
        e
        for j in final
        for e in queue.events(j.id)
        if e.to_status is JobStatus.queued and "controller" in e.reason
    ]
    assert lost, f"the kills should have cost some attempts: {kills}"
    assert all(j.infra_retries == 0 for j in final), "controller loss is not charged to jobs"
