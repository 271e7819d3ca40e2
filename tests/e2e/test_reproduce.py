"""Resume across processes and `lorajobs reproduce`, through the CLI as users run it.

`LORAJOBS_STOP_AFTER_STEP` is a test hook: the attempt checkpoints after that step and stops
as a preempted node would; the next `lorajobs run` with the same job id resumes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.e2e.cli import CLI
from tests.plugins.specs import WEIGHTS, adapter_path, sha256, tiny_inputs, write_spec

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind", ["image", "text"])
def test_stop_after_10_then_resume_in_a_new_process_equals_20_straight(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    model, data = tiny_inputs(request, kind)
    spec = write_spec(
        tmp_path / "s.yaml",
        kind,
        f"resume-{kind}",
        str(model),
        str(data),
        # (accumulation is covered in-process: tests/integration/test_resume.py)
        training={"steps": 20, "checkpoint_every": 5, "lr_scheduler": "cosine", "warmup_steps": 2},
        lora={"rank": 4, "alpha": 8, "dropout": 0.1},
    )
    bucket = tmp_path / "bucket"
    cli = CLI(home=tmp_path / "home")
    straight = cli("run", str(spec), "-o", str(bucket), "--job-id", "straight")
    assert straight.code == 0, straight.err[-3000:]

    stopping = CLI(home=tmp_path / "home", env={"LORAJOBS_STOP_AFTER_STEP": "10"})
    first = stopping("run", str(spec), "-o", str(bucket), "--job-id", "split")
    assert first.code == 1 and "stopped after step 10" in first.err, first.err[-3000:]
    assert (bucket / "jobs/split/checkpoints/step-10/COMPLETE").is_file()
    assert not (bucket / "adapters").joinpath(f"resume-{kind}", "split").exists()

    second = cli("run", str(spec), "-o", str(bucket), "--job-id", "split")
    assert second.code == 0, second.err[-3000:]

    a, b = adapter_path(straight.out), adapter_path(second.out)
    assert sha256(a / WEIGHTS[kind]) == sha256(b / WEIGHTS[kind])
    sidecar = json.loads((b / "lorajobs.json").read_text())
    assert sidecar["metrics"]["resumed_from_step"] == 10
    assert json.loads((a / "lorajobs.json").read_text())["metrics"]["resumed_from_step"] == 0


@pytest.mark.parametrize("kind", ["image", "text"])
def test_reproduce_reports_a_match_and_a_mismatch(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    model, data = tiny_inputs(request, kind)
    spec = write_spec(
        tmp_path / "s.yaml", kind, f"repro-{kind}", str(model), str(data), training={"steps": 6}
    )
    cli = CLI(home=tmp_path / "home")
    run = cli("run", str(spec), "-o", str(tmp_path / "bucket"), "--job-id", "orig")
    assert run.code == 0, run.err[-3000:]
    adapter = adapter_path(run.out)
    sidecar = json.loads((adapter / "lorajobs.json").read_text())
    assert WEIGHTS[kind] in sidecar["deterministic_files"]

    ok = cli("reproduce", run.out.strip(), "--json")
    assert ok.code == 0, ok.err[-3000:]
    report = ok.json()
    assert report["match"] is True and report["files"][WEIGHTS[kind]]["match"] is True
    assert "sha256 match" in ok.err

    if kind == "text":  # a mismatch is reported (one kind is enough: it costs a training run)
        from typer.testing import CliRunner

        from lorajobs.orchestrator.cli import app

        tampered = shutil.copytree(adapter, tmp_path / "tampered")
        sidecar["files"][WEIGHTS[kind]]["sha256"] = "0" * 64
        (tampered / "lorajobs.json").write_text(json.dumps(sidecar))
        # In this process (no second interpreter start-up): the same command, exit code 1.
        bad = CliRunner(env={"LORAJOBS_HOME": str(tmp_path / "home")}).invoke(
            app, ["reproduce", str(tampered)]
        )
        assert bad.exit_code == 1 and "MISMATCH" in bad.stdout, bad.output
