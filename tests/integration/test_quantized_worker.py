"""The worker refuses a quantized base (or 8-bit AdamW) it cannot run, in one line, before
it reads anything: no CUDA device here (CPU fallback allowed or not), or no bitsandbytes. On
this CPU-only machine every path below must refuse; the GPU side is `bench/gpu_check.py`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lorajobs.jobspecs import parse_spec
from lorajobs.jobspecs.failures import InvalidInput, NeedsCuda, NodeUnfit, classify
from lorajobs.worker.context import WorkerContext
from lorajobs.worker.entrypoint import run_job
from lorajobs.worker.trainers import get_trainer
from tests.plugins.specs import spec_dict

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU machine"),
]


def _spec(kind: str, model: Path, data: Path, **training: Any) -> Any:
    return parse_spec(
        spec_dict(kind, "q", str(model), str(data), training=training, resources={"gpus": 1})
    )


def _ctx(tmp_path: Path, cpu_fallback: bool) -> WorkerContext:
    return WorkerContext(
        job_id="j",
        output_uri=(tmp_path / "bucket").as_uri(),
        cache_dir=tmp_path / "cache",
        threads=1,
        cpu_fallback=cpu_fallback,
    )


@pytest.mark.parametrize("mode", ["nf4", "int8", "fp8"])
def test_run_job_refuses_before_it_pulls_anything(mode: str, tmp_path: Path) -> None:
    """With CPU fallback allowed (`lorajobs run`, or a node that allows it) the job would
    train on the CPU: a quantized base cannot, so it fails as a user error (exit 2), and the
    missing dataset is never looked at."""
    spec = _spec("text", tmp_path / "no-model", tmp_path / "no-data", quantize_base=mode)
    with pytest.raises(NeedsCuda) as err:
        run_job(spec, _ctx(tmp_path, cpu_fallback=True))
    assert str(err.value).startswith(
        f"training.quantize_base {mode} needs a CUDA GPU and this machine has none"
    )
    if mode != "fp8":  # bitsandbytes is not installed here (CI): the extra is named
        assert "pip install 'lorajobs[quant]'" in str(err.value)
    assert classify(err.value).value == "user" and err.value.exit_code == 2
    assert not (tmp_path / "cache").exists() and not (tmp_path / "bucket").exists()


def test_without_cpu_fallback_the_node_is_at_fault(tmp_path: Path) -> None:
    """A node that advertised a GPU it cannot use: the attempt goes to another node."""
    spec = _spec("text", tmp_path / "m", tmp_path / "d", quantize_base="nf4")
    with pytest.raises(NodeUnfit, match="no usable CUDA device"):
        run_job(spec, _ctx(tmp_path, cpu_fallback=False))


@pytest.mark.parametrize("training", [{"quantize_base": "nf4"}, {"optimizer": "adamw8bit"}])
def test_the_text_trainer_refuses_on_its_own(
    training: dict[str, Any], tiny_text_model: Path, tiny_text_dataset: Path, tmp_path: Path
) -> None:
    spec = _spec("text", tiny_text_model, tiny_text_dataset, **training)
    with pytest.raises(NeedsCuda, match="needs a CUDA GPU and this machine has none"):
        get_trainer("text")(
            spec, tiny_text_model, tiny_text_dataset, tmp_path, _ctx(tmp_path, True)
        )
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_the_image_trainer_quantizes_only_flux_bases(
    tiny_image_model: Path, tiny_image_dataset: Path, tmp_path: Path
) -> None:
    """A UNet (SD / SDXL) base with quantize_base: refused as the spec's mistake, on any
    machine, before anything loads; the CUDA refusal guards the Flux path."""
    spec = _spec("image", tiny_image_model, tiny_image_dataset, quantize_base="nf4")
    with pytest.raises(InvalidInput) as err:
        get_trainer("image")(
            spec, tiny_image_model, tiny_image_dataset, tmp_path, _ctx(tmp_path, True)
        )
    assert str(err.value) == (
        f"training.quantize_base: only Flux bases are quantized; {tiny_image_model} is a UNet "
        "pipeline (SD / SDXL): drop quantize_base"
    )
    assert list(tmp_path.iterdir()) == []
    spec = _spec("image", tiny_image_model, tiny_image_dataset, optimizer="adamw8bit")
    with pytest.raises(NeedsCuda, match="training.optimizer adamw8bit needs a CUDA GPU"):
        get_trainer("image")(
            spec, tiny_image_model, tiny_image_dataset, tmp_path, _ctx(tmp_path, True)
        )
