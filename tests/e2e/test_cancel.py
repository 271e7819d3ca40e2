"""Cancel a queued job and a running job: both end `cancelled`, and nothing is uploaded."""

from __future__ import annotations

import json
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
    queued = write_spec(
        tmp_path / "q.yaml",
        "text",
        "to-cancel-queued",
        str(tiny_text_model),
        str(tiny_text_dataset),
        training=long,
    )
    running = write_spec(
        tmp_path / "r.yaml",
        "text",
        "to-cancel-running",
        str(tiny_text_model),
        str(tiny_text_dataset),
        training=long,
    )

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
    # The controller stopped its own attempt: no "taking it over", no refused transition, and
    # every line says its level.
    log = (tmp_path / "controller.log").read_text()
    assert "taking it over" not in log and "cannot move it" not in log, log[-3000:]
    assert f"INFO lorajobs.controller job {r_id} -> cancelled: cancelled by user" in log
    adapters = tmp_path / "home" / "bucket" / "adapters"
    assert not adapters.exists() or not any(p.is_file() for p in adapters.rglob("*"))


def test_logs_show_attempts_and_retry_through_the_cli(
    tmp_path: Path, tiny_text_model: Path, tiny_text_dataset: Path
) -> None:
    cli = CLI(home=tmp_path / "home", env={"LORAJOBS_PRICES": "cpu=0.36"})
    spec = write_spec(
        tmp_path / "ok.yaml",
        "text",
        "logged",
        str(tiny_text_model),
        str(tiny_text_dataset),
        max_runtime="10m",
    )
    r = cli("submit", str(spec), "--wait", "--json")
    assert r.code == 0, r.err[-2000:]
    assert "estimated cost: $0.36/h; at most $0.06 per attempt (max_runtime)" in r.err
    (job,) = r.json()
    log = cli("logs", job["id"])
    assert log.code == 0 and f"job {job['id']} attempt 1" in log.out
    assert "step 20/20" in log.out and "adapter uploaded to" in log.out
    assert cli("logs", job["id"], "-f", timeout=30).out == log.out  # ended: prints and returns
    shown = cli("show", job["id"], "--json").json()
    sidecar = json.loads(
        (Path(shown["adapter_uri"].removeprefix("file://")) / "lorajobs.json").read_text()
    )
    assert sidecar["extra"]["cost"]["usd_per_hour"] == 0.36
    assert sidecar["extra"]["cost"]["total_usd"] > 0
    (attempt,) = shown["attempts"]
    assert attempt["outcome"] == "succeeded" and attempt["accelerator"] is None
    assert shown["cost_usd"] > 0 and attempt["cost_usd"] == shown["cost_usd"]
    assert shown["cost_estimate"]["max_per_attempt"] == 0.06
    text = cli("show", job["id"]).out
    assert "attempts" in text and "cost: $" in text
    status = cli("status").out
    assert all(col in status for col in ("ETA", "NODE", "GPU", "ATTEMPT"))

    # A failed job goes back to the queue with `retry`, as a new attempt.
    bad = write_spec(
        tmp_path / "bad.yaml",
        "text",
        "bad",
        str(tiny_text_model),
        (tmp_path / "missing.jsonl").as_uri(),
    )
    r = cli("submit", str(bad), "--wait", "--json")
    (failed,) = r.json()
    assert r.code == 1 and failed["state"] == "failed" and failed["failure_kind"] == "user"
    assert cli("retry", job["id"]).code == 2  # succeeded: nothing to retry
    r = cli("retry", failed["id"][:6])
    assert r.code == 0 and r.out.strip() == failed["id"] and "attempt 2" in r.err
    (again,) = [j for j in cli("status", "--json").json() if j["id"] == failed["id"]]
    assert (again["state"], again["attempt"]) == ("queued", 2)
    # Still queued: it can be reprioritised.
    r = cli("priority", failed["id"], "7")
    assert r.code == 0 and "priority 0 -> 7" in r.err
    assert cli("show", failed["id"], "--json").json()["priority"] == 7
    assert cli("priority", job["id"], "7").code == 2  # not queued any more
    assert cli("logs", failed["id"], "--attempt", "3").code == 2
