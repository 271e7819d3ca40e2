"""Adapter exports: the kohya file loads in diffusers and plays like the diffusers file; header
metadata; what is byte-deterministic and what is not; loss.png; text `export --merge`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from lorajobs.jobspecs.models import ImageJobSpec, TextJobSpec
from lorajobs.worker.context import TrainOutput, WorkerContext
from lorajobs.worker.trainers import get_trainer

pytestmark = pytest.mark.slow

THREADS = 1
DIFFUSERS = "pytorch_lora_weights.safetensors"


def _image_spec(steps: int = 3, **lora: Any) -> ImageJobSpec:
    return ImageJobSpec(
        kind="image",
        name="shapes-lora",
        base_model="tiny-sd",
        dataset="data/shapes",
        lora={"rank": 4, "alpha": 8.0, **lora},
        training={"steps": steps, "batch_size": 2, "resolution": 64, "learning_rate": 1e-2},
    )


def _ctx(tmp: Path) -> WorkerContext:
    return WorkerContext(job_id="j", output_uri=tmp.as_uri(), cache_dir=tmp, threads=THREADS)


def _train(kind: str, spec: Any, model: Path, data: Path, out: Path) -> TrainOutput:
    return get_trainer(kind)(spec, model, data, out, _ctx(out.parent))


def _unet_output(model: Path, lora_dir: Path, weight_name: str) -> torch.Tensor:
    """The UNet's prediction on a fixed input with the LoRA loaded by diffusers."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    pipe.load_lora_weights(lora_dir, weight_name=weight_name)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn((1, 4, 32, 32), generator=gen)
    context = torch.randn((1, 77, 32), generator=gen)
    with torch.no_grad():
        return pipe.unet(sample, torch.tensor([500]), encoder_hidden_states=context).sample


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_kohya_file_loads_in_diffusers_like_the_diffusers_file(
    rslora: bool, tiny_image_model: Path, tiny_image_dataset: Path, tmp_path: Path
) -> None:
    torch.set_num_threads(THREADS)
    out = tmp_path / "adapter"
    result = _train(
        "image", _image_spec(use_rslora=rslora), tiny_image_model, tiny_image_dataset, out
    )
    kohya = "shapes-lora.safetensors"
    assert result.files == [DIFFUSERS, kohya, "loss.png"]

    with safe_open(out / kohya, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert {k.split(".", 1)[1] for k in keys} == {"alpha", "lora_down.weight", "lora_up.weight"}
    assert alphas == {8.0 * 2.0 if rslora else 8.0}  # rsLoRA: alpha*sqrt(r) keeps alpha/sqrt(r)

    via_diffusers = _unet_output(tiny_image_model, out, DIFFUSERS)
    via_kohya = _unet_output(tiny_image_model, out, kohya)
    torch.testing.assert_close(via_kohya, via_diffusers, rtol=0, atol=1e-5)

    # ... and the LoRA does something (it is not two empty adapters agreeing).
    from diffusers import StableDiffusionPipeline

    plain = StableDiffusionPipeline.from_pretrained(tiny_image_model, local_files_only=True)
    gen = torch.Generator().manual_seed(0)
    sample, context = (
        torch.randn((1, 4, 32, 32), generator=gen),
        torch.randn((1, 77, 32), generator=gen),
    )
    with torch.no_grad():
        untouched = plain.unet(sample, torch.tensor([500]), encoder_hidden_states=context).sample
    assert (via_kohya - untouched).abs().max().item() > 1e-4

    # Header metadata: kohya ss_* and modelspec.* keys, with the run's times.
    for key in (
        "ss_network_dim",
        "ss_network_alpha",
        "ss_base_model_version",
        "ss_output_name",
        "ss_training_started_at",
        "ss_training_finished_at",
        "ss_num_train_images",
        "ss_steps",
        "ss_seed",
        "ss_learning_rate",
        "ss_resolution",
        "ss_tag_frequency",
        "ss_datasets",
        "modelspec.title",
        "modelspec.architecture",
        "modelspec.date",
        "modelspec.hash_sha256",
    ):
        assert key in meta, key
    assert meta["ss_network_dim"] == "4" and meta["ss_output_name"] == "shapes-lora"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_steps"] == "3"
    assert meta["ss_resolution"] == "(64, 64)" and meta["ss_num_train_images"] == "8"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(meta["ss_tag_frequency"])["shapes"]  # caption tags counted per folder
    assert float(meta["ss_training_finished_at"]) >= float(meta["ss_training_started_at"])


def test_diffusers_file_is_byte_deterministic_kohya_file_only_in_its_tensors(
    tiny_image_model: Path, tiny_image_dataset: Path, tmp_path: Path
) -> None:
    """The promise: pytorch_lora_weights.safetensors repeats byte for byte (its header holds no
    times); the kohya file repeats its tensors and every header key but the three times."""
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        _train("image", _image_spec(steps=2), tiny_image_model, tiny_image_dataset, out)
    digest = [hashlib.sha256((o / DIFFUSERS).read_bytes()).hexdigest() for o in outs]
    assert digest[0] == digest[1]
    with safe_open(outs[0] / DIFFUSERS, "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["modelspec.title"] == "shapes-lora"
    assert not any(k in meta for k in ("ss_training_started_at", "modelspec.date"))
    assert (outs[0] / "loss.png").read_bytes() == (outs[1] / "loss.png").read_bytes()

    times = {"ss_training_started_at", "ss_training_finished_at", "modelspec.date"}
    seen = []
    for o in outs:
        with safe_open(o / "shapes-lora.safetensors", "pt") as f:
            seen.append(({k: f.get_tensor(k) for k in f.keys()}, f.metadata()))
    (ta, ma), (tb, mb) = seen
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert {k: v for k, v in ma.items() if k not in times} == {
        k: v for k, v in mb.items() if k not in times
    }
    assert times <= ma.keys()


def test_loss_png_and_model_card(
    tiny_image_model: Path, tiny_image_dataset: Path, tmp_path: Path
) -> None:
    from lorajobs.worker.sidecar import model_card

    out = tmp_path / "adapter"
    result = _train("image", _image_spec(steps=3), tiny_image_model, tiny_image_dataset, out)
    with Image.open(out / "loss.png") as img:
        assert img.format == "PNG" and img.size == (640, 360)
        # Something was drawn in the curve's colour.
        assert (31, 119, 180) in {c for _, c in img.convert("RGB").getcolors(1 << 20)}
    card = model_card(_image_spec(steps=3), result)
    for needle in (
        "![training loss](loss.png)",
        "| learning_rate | 0.01 |",
        "shapes-lora.safetensors",
        "load_lora_weights",
        "Final loss",
    ):
        assert needle in card, needle


def test_dora_image_adapter_has_no_kohya_file(
    tiny_image_model: Path, tiny_image_dataset: Path, tmp_path: Path
) -> None:
    result = _train(
        "image",
        _image_spec(steps=2, use_dora=True),
        tiny_image_model,
        tiny_image_dataset,
        tmp_path / "o",
    )
    assert result.files == [DIFFUSERS, "loss.png"]
    assert result.resolved["kohya_file"] is None


def test_text_export_merge_gives_a_full_model_with_the_same_logits(
    tiny_text_model: Path, tiny_text_dataset: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorajobs.worker.merge import merge_into_base

    spec = TextJobSpec(
        kind="text",
        name="t",
        base_model=str(tiny_text_model),
        dataset="d",
        lora={"rank": 4, "alpha": 8},
        training={"steps": 8, "batch_size": 4, "learning_rate": 5e-3, "max_seq_length": 64},
    )
    adapter = tmp_path / "adapter"
    _train("text", spec, tiny_text_model, tiny_text_dataset, adapter)
    merge_into_base(adapter, tiny_text_model, tmp_path / "merged")

    ids = torch.tensor([[1, 5, 9, 17, 33, 2, 8]])
    base = AutoModelForCausalLM.from_pretrained(tiny_text_model, local_files_only=True).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    with torch.no_grad():
        plain = base(ids).logits
        stacked = PeftModel.from_pretrained(base, adapter).eval()(ids).logits
        folded = merged(ids).logits
    assert (stacked - plain).abs().max().item() > 1e-4  # the adapter changes something
    torch.testing.assert_close(folded, stacked, rtol=0, atol=1e-5)
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_export_merge_command(
    tiny_text_model: Path, tiny_text_dataset: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from lorajobs.orchestrator.cli import app

    spec = TextJobSpec(
        kind="text",
        name="t",
        base_model=str(tiny_text_model),
        dataset="d",
        lora={"rank": 4, "alpha": 8},
        training={"steps": 2, "max_seq_length": 64},
    )
    adapter = tmp_path / "adapter"
    _train("text", spec, tiny_text_model, tiny_text_dataset, adapter)
    # No sidecar here: the base model comes from adapter_config.json (the spec's base_model).
    r = CliRunner(env={"LORAJOBS_HOME": str(tmp_path / "home")}).invoke(
        app, ["export", str(adapter), "--merge", "-o", str(tmp_path / "full")]
    )
    assert r.exit_code == 0, r.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "full", local_files_only=True)
    assert model.config.model_type == "llama"
    assert (tmp_path / "full" / "tokenizer.json").is_file()
