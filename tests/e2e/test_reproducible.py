"""Same spec, same seed, same thread count: byte-identical adapters, run after run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.e2e.cli import CLI, write_spec

pytestmark = pytest.mark.slow

WEIGHTS = {"image": ["pytorch_lora_weights.safetensors"],
           "text": ["adapter_model.safetensors", "adapter_config.json"]}


@pytest.mark.parametrize("kind", ["image", "text"])
def test_two_local_runs_give_identical_adapters(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    model = request.getfixturevalue(f"tiny_{kind}_model")
    data = request.getfixturevalue(f"tiny_{kind}_dataset")
    spec = write_spec(tmp_path / "s.yaml", kind, f"repro-{kind}", str(model), str(data),
                      training={"steps": 8})
    cli = CLI(home=tmp_path / "home")
    digests = []
    for i in range(2):
        r = cli("run", str(spec), "-o", str(tmp_path / f"out{i}"), "--job-id", "same")
        assert r.code == 0, r.err[-3000:]
        adapter = Path(r.out.strip().removeprefix("file://"))
        sidecar = json.loads((adapter / "lorajobs.json").read_text())
        digests.append({f: hashlib.sha256((adapter / f).read_bytes()).hexdigest()
                        for f in WEIGHTS[kind]})
        assert {f: sidecar["files"][f]["sha256"] for f in WEIGHTS[kind]} == digests[-1]
    assert digests[0] == digests[1]
