"""A quantized-base (or 8-bit AdamW) spec where no node could run it — jobs run on this
machine and it has no CUDA GPU — gets one clear line at submit, from the CLI (exit 2) and from
the API (422), and nothing is queued: not it, and not the good specs submitted with it.

`CUDA_VISIBLE_DEVICES=""` makes "this machine has no GPU" true on any machine, as it is for
the processes lorajobs starts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.cli import CLI, write_spec
from tests.plugins.service import ApiServer, start_api_server
from tests.plugins.specs import spec_dict

pytestmark = pytest.mark.slow

NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}
CASES = [
    ({"quantize_base": "nf4"}, "training.quantize_base nf4 needs a CUDA GPU"),
    ({"quantize_base": "fp8"}, "training.quantize_base fp8 needs a CUDA GPU"),
    ({"optimizer": "adamw8bit"}, "training.optimizer adamw8bit needs a CUDA GPU"),
]


def _inputs(tmp_path: Path) -> tuple[Path, Path]:
    model, data = tmp_path / "model", tmp_path / "data.jsonl"
    model.mkdir(exist_ok=True)
    data.write_text('{"text": "hello"}\n')
    return model, data


@pytest.mark.parametrize("training,line", CASES, ids=[c[1].split(" needs")[0] for c in CASES])
def test_the_cli_refuses_in_one_line_and_queues_nothing(
    tmp_path: Path, training: dict[str, Any], line: str
) -> None:
    model, data = _inputs(tmp_path)
    good = write_spec(tmp_path / "good.yaml", "text", "good", str(model), str(data))
    bad = write_spec(
        tmp_path / "bad.yaml",
        "text",
        "bad",
        str(model),
        str(data),
        training=training,
        resources={"gpus": 1, "cpus": 1},
    )
    cli = CLI(home=tmp_path / "home", env=NO_GPU)
    r = cli("submit", str(good), str(bad))
    assert r.code == 2, r.err
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and line in lines[0] and str(bad) in lines[0], r.err
    assert "no node here has one" in lines[0] and "LORAJOBS_RAY_ADDRESS" in lines[0]
    assert r.out == ""
    assert cli("status", "--json").json() == []  # the good spec was not queued either


def test_a_gpu_less_cpu_spec_is_refused_before_any_node_is_asked(tmp_path: Path) -> None:
    """`resources.gpus: 0` with a quantized base: refused by the spec itself, in every mode."""
    model, data = _inputs(tmp_path)
    bad = write_spec(
        tmp_path / "bad.yaml",
        "text",
        "bad",
        str(model),
        str(data),
        training={"quantize_base": "int8"},
    )
    cli = CLI(home=tmp_path / "home")
    for command in ("validate", "submit"):
        r = cli(command, str(bad))
        assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
        assert "training.quantize_base int8 needs a CUDA GPU: set resources.gpus" in r.err


@pytest.fixture
def gpu_less_server(tmp_path: Path) -> Iterator[ApiServer]:
    server = start_api_server(tmp_path / "server-home", env=NO_GPU)
    try:
        yield server
    finally:
        server.stop()


def test_the_api_refuses_with_422_and_queues_nothing(gpu_less_server: ApiServer) -> None:
    root = f"file://{(gpu_less_server.cli.home / 'bucket').as_posix()}/owners/acme"
    spec = spec_dict(
        "text",
        "q",
        f"{root}/models/m",
        f"{root}/datasets/d",
        training={"quantize_base": "nf4"},
        resources={"gpus": 1, "cpus": 1},
    )
    token = gpu_less_server.token("acme")
    with gpu_less_server.http(token) as c:
        for verb in ("/v1/validate", "/v1/jobs"):
            r = c.post(verb, json={"spec": spec})
            assert r.status_code == 422, r.text
            problems = r.json()["problems"]
            assert len(problems) == 1, problems
            assert problems[0].startswith("training.quantize_base nf4 needs a CUDA GPU"), problems
        assert c.get("/v1/jobs").json()["jobs"] == []
        # The same spec without the quantized base is queued (the refusal is that setting's).
        del spec["training"]["quantize_base"]
        assert c.post("/v1/jobs", json={"spec": spec}).status_code == 201
    assert len(gpu_less_server.cli("status", "--json").json()) == 1


def test_lorajobs_run_refuses_in_one_line_before_reading_anything(tmp_path: Path) -> None:
    """`lorajobs run` trains here and may fall back to the CPU: not with a quantized base."""
    model, data = _inputs(tmp_path)  # empty: never read, the refusal comes first
    bad = write_spec(
        tmp_path / "bad.yaml",
        "text",
        "bad",
        str(model),
        str(data),
        training={"quantize_base": "nf4"},
        resources={"gpus": 1, "cpus": 1},
    )
    r = CLI(home=tmp_path / "home", env=NO_GPU)("run", str(bad))
    assert r.code == 2, r.err
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert len(lines) == 1, r.err
    assert "training.quantize_base nf4 needs a CUDA GPU and this machine has none" in lines[0]
    assert not (tmp_path / "home" / "bucket").exists()
