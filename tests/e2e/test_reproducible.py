"""Same spec, same seed, same thread count: byte-identical adapters, run after run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.cli import CLI
from tests.plugins.specs import WEIGHTS, adapter_path, sha256, tiny_inputs, write_spec

pytestmark = pytest.mark.slow

FILES = {"image": [WEIGHTS["image"]], "text": [WEIGHTS["text"], "adapter_config.json"]}


@pytest.mark.parametrize("kind", ["image", "text"])
def test_two_local_runs_give_identical_adapters(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    model, data = tiny_inputs(request, kind)
    spec = write_spec(
        tmp_path / "s.yaml", kind, f"repro-{kind}", str(model), str(data), training={"steps": 8}
    )
    cli = CLI(home=tmp_path / "home")
    digests = []
    for i in range(2):
        r = cli("run", str(spec), "-o", str(tmp_path / f"out{i}"), "--job-id", "same")
        assert r.code == 0, r.err[-3000:]
        adapter = adapter_path(r.out)
        sidecar = json.loads((adapter / "lorajobs.json").read_text())
        digests.append({f: sha256(adapter / f) for f in FILES[kind]})
        assert {f: sidecar["files"][f]["sha256"] for f in FILES[kind]} == digests[-1]
    assert digests[0] == digests[1]
