"""`submit`, `status`, `show`, `cancel` and `validate` stay light: no torch, no Ray.

They are the commands users run all day; importing the training stack would add seconds and
hundreds of MB to each."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.cli import CLI, write_spec

HEAVY = ("torch", "diffusers", "transformers", "peft", "ray")

PROBE = """
import atexit, sys
atexit.register(lambda: print("HEAVY=" + ",".join(
    m for m in {heavy!r} if m in sys.modules), file=sys.stderr))
sys.argv = ["lorajobs", *sys.argv[1:]]
from lorajobs.orchestrator.cli import main
main()
"""


def _heavy_modules(cli: CLI, *args: str) -> list[str]:
    p = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *args],
        capture_output=True,
        text=True,
        env=cli.environ(),
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    line = [x for x in p.stderr.splitlines() if x.startswith("HEAVY=")][-1]
    return [m for m in line.removeprefix("HEAVY=").split(",") if m]


@pytest.mark.slow
def test_queue_commands_import_no_training_stack(tmp_path: Path) -> None:
    cli = CLI(home=tmp_path / "home")
    spec = write_spec(tmp_path / "s.yaml", "text", "light", "file:///m", "file:///d.jsonl")
    assert _heavy_modules(cli, "validate", str(spec)) == []
    assert _heavy_modules(cli, "submit", str(spec)) == []
    job_id = cli("status", "--json").json()[0]["id"]
    assert _heavy_modules(cli, "status") == []
    assert _heavy_modules(cli, "status", "--json") == []
    assert _heavy_modules(cli, "show", job_id) == []
    assert _heavy_modules(cli, "cancel", job_id) == []
