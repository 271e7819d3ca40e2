"""Cancel a queued job and a running job: both end `cancelled`, and nothing is uploaded."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.e2e.cli import CLI, write_spec

pytestmark = pytest.mark.slow


def _wait_for(cli: CLI, job_id: str, states: set[str], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        (job,) = [j for j in cli("status", "--json").json() if j["id"] == job_id]
        if job["state"] in states:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} never reached {states}; last: {job['state']}")


def test_cancel_queued_and_running_jobs(
    tmp_path: Path, tiny_text_model: Path, tiny_text_dataset: Path
) -> None:
    cli = CLI(home=tmp_path / "home")
    long = {"steps": 1_000_000}
    queued = write_spec(tmp_path / "q.yaml", "text", "to-cancel-queued", str(tiny_text_model),
                        str(tiny_text_dataset), training=long)
    running = write_spec(tmp_path / "r.yaml", "text", "to-cancel-running", str(tiny_text_model),
                         str(tiny_text_dataset), training=long)

    q_id = cli("submit", str(queued)).out.strip()
    r = cli("cancel", q_id[:6])
    assert r.code == 0 and "cancelled" in r.err
    assert _wait_for(cli, q_id, {"cancelled"}, timeout=5)["attempt"] == 1
    assert cli("cancel", q_id).code == 2  # already cancelled: bad input, nothing changes

    r_id = cli("submit", str(running)).out.strip()
    controller = cli.popen("controller", log=tmp_path / "controller.log")
    try:
        job = _wait_for(cli, r_id, {"running"}, timeout=180)
        deadline = time.monotonic() + 60
        while (job.get("step") or 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
            job = _wait_for(cli, r_id, {"running"})
        assert cli("cancel", r_id).code == 0
        t0 = time.monotonic()
        job = _wait_for(cli, r_id, {"cancelled", "succeeded", "failed"}, timeout=60)
        assert job["state"] == "cancelled", (tmp_path / "controller.log").read_text()[-3000:]
        assert time.monotonic() - t0 < 15
    finally:
        controller.send_signal(signal.SIGTERM)
        controller.wait(timeout=60)

    events = cli("show", r_id, "--json").json()["events"]
    assert [e["to_status"] for e in events] == ["queued", "dispatched", "running", "cancelled"]
    adapters = tmp_path / "home" / "bucket" / "adapters"
    assert not adapters.exists() or not any(p.is_file() for p in adapters.rglob("*"))
