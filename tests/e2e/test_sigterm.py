"""A preemption notice through the CLI: `lorajobs run` gets SIGTERM mid-training, checkpoints
the step it finishes and exits as preempted; the next run of the job resumes from that step and
gives the adapter of an uninterrupted run, byte for byte."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.cli import CLI
from tests.plugins.specs import WEIGHTS, adapter_path, sha256, write_spec

pytestmark = pytest.mark.slow

STEPS = 200  # ~1-2 s of training: the notice lands after the first progress line (~0.5 s)


def _wait_for_training(proc: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    """Until the run prints its first progress line (a step is done, the loop is running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(rb"^step \d+/", log.read_bytes(), re.MULTILINE):
            return
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.01)
    raise AssertionError(f"no progress within {timeout} s:\n{log.read_text()[-3000:]}")


def test_sigterm_checkpoints_then_the_next_run_resumes_to_the_same_adapter(
    tiny_text_model: Path, tiny_text_dataset: Path, tmp_path: Path
) -> None:
    # No periodic checkpoints: the only one can come from the notice.
    spec = write_spec(
        tmp_path / "s.yaml",
        "text",
        "sigterm",
        str(tiny_text_model),
        str(tiny_text_dataset),
        training={"steps": STEPS, "checkpoint_every": 0},
    )
    bucket = tmp_path / "bucket"
    cli = CLI(home=tmp_path / "home")
    # The uninterrupted run, alongside (it shares nothing with the other job but the bucket).
    straight = cli.popen(
        "run", str(spec), "-o", str(bucket), "--job-id", "straight", log=tmp_path / "straight.log"
    )

    log = tmp_path / "first.log"
    proc = cli.popen("run", str(spec), "-o", str(bucket), "--job-id", "split", log=log)
    try:
        _wait_for_training(proc, log)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        straight_code = straight.wait(timeout=300)
    finally:
        for p in (proc, straight):
            if p.poll() is None:
                p.kill()
    out = log.read_text()
    stopped = re.search(r"stopped after step (\d+): SIGTERM \(checkpointed\)", out)
    assert code == 1 and stopped, out[-3000:]
    step = int(stopped.group(1))
    assert 0 < step < STEPS
    ckpts = bucket / "jobs" / "split" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [f"step-{step}"]
    assert (ckpts / f"step-{step}" / "COMPLETE").is_file()
    assert not (bucket / "adapters" / "sigterm" / "split").exists()  # nothing half-exported

    resumed = cli("run", str(spec), "-o", str(bucket), "--job-id", "split")
    assert resumed.code == 0, resumed.err[-3000:]

    straight_out = (tmp_path / "straight.log").read_text()
    assert straight_code == 0, straight_out[-3000:]
    a = bucket / "adapters" / "sigterm" / "straight"
    b = adapter_path(resumed.out)
    assert json.loads((b / "lorajobs.json").read_text())["metrics"]["resumed_from_step"] == step
    assert sha256(b / WEIGHTS["text"]) == sha256(a / WEIGHTS["text"])
    assert sha256(b / "loss.png") == sha256(a / "loss.png")  # the loss history survived too
