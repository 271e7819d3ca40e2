"""A newcomer's walk through `docs/cluster.md`, as written: its `<!-- walk -->` blocks run in
order, in one bash, inside a private network namespace (so Ray's, PostgreSQL's and SeaweedFS's
ports stay on this test): PostgreSQL and SeaweedFS from `infra/local/`, a Ray head and a worker
node with `ray start`, the controller, then data push, submit, status, logs -f, show, fetch,
adapters and cancel. The `<!-- walk: cleanup -->` block stops everything by PID, also when a
step fails. If the docs drift from the product, this fails."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "cluster.md"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def walk_blocks(text: str) -> tuple[list[str], str]:
    """(the walk's bash blocks in order, its cleanup block) from the marked fences."""
    found = re.findall(r"<!-- walk(: cleanup)? -->\s*\n```bash\n(.*?)```", text, re.S)
    steps = [body for cleanup, body in found if not cleanup]
    cleanups = [body for cleanup, body in found if cleanup]
    assert steps and len(cleanups) == 1, "docs/cluster.md: walk blocks or its cleanup missing"
    return steps, cleanups[0]


def test_the_walk_is_found() -> None:
    steps, cleanup = walk_blocks(DOC.read_text())
    commands = "\n".join(steps)
    for needed in (
        "ray start --head",
        "lorajobs controller",
        "lorajobs data push",
        "lorajobs submit",
        "lorajobs logs -f",
        "lorajobs fetch",
        "lorajobs cancel",
    ):
        assert needed in commands, needed
    assert "kill" in cleanup and not re.search(r"\bray\s+stop\b", cleanup)


def test_a_newcomer_walks_docs_cluster_md_to_a_succeeded_job(tmp_path: Path) -> None:
    unshare = shutil.which("unshare")
    assert unshare, "unshare (util-linux) is needed to keep the walk's ports private"
    steps, cleanup = walk_blocks(DOC.read_text())
    # The postgres user must reach TRY (PostgreSQL runs as postgres under root); Ray's socket
    # paths must stay short.
    try_dir = Path(tempfile.mkdtemp(prefix="ljwalk-", dir="/tmp"))
    try_dir.chmod(0o755)
    script = tmp_path / "walk.sh"
    script.write_text(
        "set -euo pipefail\n"
        "ip link set lo up\n"
        f"cd {ROOT}\n"
        # The cleanup runs however the walk ends; its own failures must not hide the walk's.
        "cleanup() {\n  set +e\n"
        + cleanup
        + "}\ntrap cleanup EXIT\n"
        + "\n".join(f"echo '+++ walk step {i}'\n{body}" for i, body in enumerate(steps, 1))
        + "echo '+++ walk done'\n"
    )
    bin_dir = str(Path(sys.executable).parent)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LORAJOBS_", "AWS_", "RAY_", "SEAWEED_"))
    }
    env.update(
        TRY=str(try_dir),
        PATH=f"{bin_dir}:{env.get('PATH', '')}",
        RAY_TMPDIR=str(try_dir / "r"),
        RAY_AUTH_MODE="disabled",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    try:
        proc = subprocess.run(
            [unshare, "--net", "--", "bash", str(script)],
            env=env,
            capture_output=True,
            text=True,
            timeout=840,
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0 and "+++ walk done" in out, out[-6000:]
        assert "created the schema at revision" in out
        assert re.search(r"job \w{12} succeeded", out), out[-4000:]
        assert "sha256 verified" in out and "try-patterns" in out
        fetched = list((try_dir / "adapters").glob("try-patterns-*/adapter_model.safetensors"))
        assert len(fetched) == 1, sorted(p.name for p in (try_dir / "adapters").iterdir())
        assert re.search(r"job \w{12}(:)? cancel(led| requested)", out), out[-4000:]
        controller_log = (try_dir / "controller.log").read_text()
        assert "Traceback" not in controller_log, controller_log[-3000:]
        # Everything the walk started is gone: every PID it recorded.
        for pid_file in try_dir.glob("*.pid"):
            pid = int(pid_file.read_text().split()[0])
            assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), pid_file.name
    finally:
        shutil.rmtree(try_dir, ignore_errors=True)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True
