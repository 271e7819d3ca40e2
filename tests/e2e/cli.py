"""Helpers to run the `lorajobs` CLI as a subprocess, the way users do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.plugins.specs import write_spec

__all__ = ["CLI", "LORAJOBS", "Result", "write_spec"]

LORAJOBS = [sys.executable, "-m", "lorajobs.orchestrator.cli"]


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class CLI:
    """A `lorajobs` with its own home, database, bucket and Ray temp dir."""

    home: Path
    env: dict[str, str] = field(default_factory=dict)

    def environ(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAJOBS_", "AWS_"))}
        # Ray's socket paths must stay short: a temp dir under /tmp, not pytest's deep tmp_path.
        ray_tmp = tempfile.mkdtemp(prefix="ljray-", dir="/tmp")
        env.update(
            LORAJOBS_HOME=str(self.home),
            RAY_TMPDIR=ray_tmp,
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            RAY_USAGE_STATS_ENABLED="0",
            RAY_AUTH_MODE="disabled",
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
            PYTHONUNBUFFERED="1",
            # `lorajobs login` keeps its token here: never the developer's own.
            XDG_CONFIG_HOME=str(self.home / "config"),
        )
        env.update(self.env)
        return env

    def __call__(self, *args: str, timeout: float = 600, cwd: Path | None = None) -> Result:
        p = subprocess.run(
            [*LORAJOBS, *args],
            capture_output=True,
            text=True,
            env=self.environ(),
            timeout=timeout,
            cwd=cwd,
        )
        return Result(p.returncode, p.stdout, p.stderr)

    def popen(self, *args: str, log: Path) -> subprocess.Popen[bytes]:
        f = open(log, "wb")  # noqa: SIM115 - closed with the process by the caller
        return subprocess.Popen(
            [*LORAJOBS, *args], stdout=f, stderr=subprocess.STDOUT, env=self.environ()
        )
