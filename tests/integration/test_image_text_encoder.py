"""Text-encoder LoRA: trained with the UNet's, exported in both formats, loaded by diffusers
into the text encoder (which then encodes differently), and resumed bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lorajobs.jobspecs import parse_spec
from lorajobs.jobspecs.failures import InvalidInput, Preempted
from lorajobs.jobspecs.models import ImageJobSpec
from lorajobs.storage.checkpoints import CheckpointStore
from lorajobs.worker.context import TrainOutput, WorkerContext
from lorajobs.worker.safetensors_io import load_bytes
from lorajobs.worker.trainers.image.recipe import train
from tests.plugins.pipelines import keep_components, pipeline, render, text_states
from tests.plugins.specs import WEIGHTS, sha256, spec_dict

pytestmark = pytest.mark.slow

DIFFUSERS = WEIGHTS["image"]
KOHYA = "te.safetensors"


def _spec(lora: dict[str, Any] | None = None, **training: Any) -> ImageJobSpec:
    spec = parse_spec(
        spec_dict(
            "image",
            "te",
            "tiny-sd",
            "shapes",
            lora={"rank": 4, "alpha": 8.0, "dropout": 0.1, **(lora or {})},
            training={"steps": 8, "learning_rate": 1e-2, "train_text_encoder": True, **training},
        )
    )
    assert isinstance(spec, ImageJobSpec)
    return spec


def _ctx(
    out: Path, job: str = "j", stop: int | None = None, bucket: Path | None = None
) -> WorkerContext:
    checkpoints = CheckpointStore.for_job(bucket.as_uri(), job) if bucket is not None else None
    return WorkerContext(
        job_id=job,
        output_uri=out.as_uri(),
        cache_dir=out / "cache",
        threads=1,
        checkpoints=checkpoints,
        stop_after_step=stop,
    )


def _te_up_weights(path: Path) -> list[torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return [
            f.get_tensor(k)
            for k in f.keys()
            if k.startswith("text_encoder.") and k.endswith(".up.weight")
        ]


@pytest.fixture(scope="module")
def trained(
    tiny_image_model: Path, tiny_image_dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, TrainOutput]:
    out = tmp_path_factory.mktemp("sd1-te")
    return out, train(
        _spec(text_encoder_learning_rate=5e-3), tiny_image_model, tiny_image_dataset, out, _ctx(out)
    )


def test_sd1_text_encoder_lora_is_exported_and_recorded(
    trained: tuple[Path, TrainOutput],
) -> None:
    out, result = trained
    assert result.files == [DIFFUSERS, KOHYA, "loss.png"]
    assert result.metrics["text_cached"] is False
    r = result.resolved
    assert (r["model_family"], r["train_text_encoder"]) == ("sd1", True)
    assert r["text_encoder_learning_rate"] == 5e-3
    assert r["text_encoder_target_modules"] == ["k_proj", "out_proj", "q_proj", "v_proj"]
    with safe_open(out / DIFFUSERS, "pt") as f:
        components = {k.split(".")[0] for k in f.keys()}
        te_keys = [k for k in f.keys() if k.startswith("text_encoder.")]
    assert components == {"unet", "text_encoder"}
    # 2 layers x 4 projections x (down, up), under the text_model. paths every diffusers reads
    assert len(te_keys) == 16 and all(".text_model.encoder.layers." in k for k in te_keys)
    assert all(w.abs().max().item() > 0 for w in _te_up_weights(out / DIFFUSERS))  # B trained
    with safe_open(out / KOHYA, "pt") as f:
        meta = f.metadata()
        assert {k.split("_")[1] for k in f.keys()} == {"te", "unet"}  # lora_te_…, lora_unet_…
    assert meta["ss_network_train_unet_only"] == "False"
    assert meta["ss_text_encoder_lr"] == "0.005" and meta["ss_base_model_version"] == "sd_v1"


def test_sd1_text_encoder_lora_loads_and_changes_the_text_encoder(
    trained: tuple[Path, TrainOutput], tiny_image_model: Path, tmp_path: Path
) -> None:
    out, _ = trained
    pipe = pipeline(tiny_image_model, out, DIFFUSERS)
    assert pipe.__class__.__name__ == "StableDiffusionPipeline"
    (config,) = pipe.text_encoder.peft_config.values()
    assert (config.r, config.lora_alpha) == (4, 8.0)  # alpha survives for the text encoder too
    (before,), (after,) = text_states(pipeline(tiny_image_model)), text_states(pipe)
    assert (after - before).abs().max().item() > 1e-3

    # The whole adapter renders differently from its UNet part alone: the text encoder's LoRA
    # reaches the image.
    full = render(pipe)
    # Trained with LoRA dropout, loaded for inference without: renders repeat.
    assert np.array_equal(render(pipe), full)
    unet_part = keep_components(out / DIFFUSERS, tmp_path / "unet-only", ("unet",))
    unet_only = render(pipeline(tiny_image_model, unet_part, DIFFUSERS))
    assert np.abs(full - unet_only).mean() > 1e-3

    via_kohya = render(pipeline(tiny_image_model, out, KOHYA))
    np.testing.assert_allclose(via_kohya, full, rtol=0, atol=1e-5)


def test_text_encoder_learning_rate_drives_the_text_encoder_lora(
    tiny_image_model: Path, tiny_image_dataset: Path, tmp_path: Path
) -> None:
    """A near-zero text-encoder LR leaves its LoRA near its zero-initialised up weights while
    the UNet's trains at the main rate."""
    out = tmp_path / "slow-te"
    train(
        _spec(steps=4, text_encoder_learning_rate=1e-7),
        tiny_image_model,
        tiny_image_dataset,
        out,
        _ctx(out),
    )
    assert max(w.abs().max().item() for w in _te_up_weights(out / DIFFUSERS)) < 1e-5
    with safe_open(str(out / DIFFUSERS), "pt") as f:
        unet_up = [f.get_tensor(k) for k in f.keys() if k.startswith("unet.") and ".up." in k]
    assert max(w.abs().max().item() for w in unet_up) > 1e-3


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_resume_with_text_encoder_lora_gives_the_same_adapter(
    family: str, tiny_image_dataset: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """10 steps + resume + 10 steps == 20 straight, with every LoRA (UNet and text encoders),
    their optimizer state and two param groups in the checkpoints."""
    model = request.getfixturevalue("tiny_image_model" if family == "sd1" else "tiny_sdxl_model")
    spec = _spec(
        steps=20,
        gradient_accumulation_steps=2,
        learning_rate=5e-3,
        text_encoder_learning_rate=2e-3,
        lr_scheduler="cosine",
        warmup_steps=3,
        checkpoint_every=4,
        keep_checkpoints=2,
        seed=5,
    )
    bucket = tmp_path / "bucket"
    straight = train(
        spec,
        model,
        tiny_image_dataset,
        tmp_path / "straight",
        _ctx(tmp_path / "straight", "straight", bucket=bucket),
    )
    with pytest.raises(Preempted, match="after step 10"):
        train(
            spec,
            model,
            tiny_image_dataset,
            tmp_path / "first",
            _ctx(tmp_path / "first", "split", stop=10, bucket=bucket),
        )
    store = CheckpointStore.for_job(bucket.as_uri(), "split")
    tensors = load_bytes(store.load(10).tensors)
    assert any(k.startswith("param/text_encoder.") for k in tensors)
    if family == "sdxl":
        assert any(k.startswith("param/text_encoder_2.") for k in tensors)
    resumed = train(
        spec,
        model,
        tiny_image_dataset,
        tmp_path / "second",
        _ctx(tmp_path / "second", "split", bucket=bucket),
    )

    assert resumed.metrics["resumed_from_step"] == 10
    assert sha256(tmp_path / "second" / DIFFUSERS) == sha256(tmp_path / "straight" / DIFFUSERS)
    assert resumed.metrics["loss_curve"] == straight.metrics["loss_curve"]


def test_gradient_checkpointing_leaves_the_text_encoder_lora_as_it_is(
    tiny_image_model: Path, tiny_image_dataset: Path, tmp_path: Path
) -> None:
    """Checkpointing recomputes activations; the trained LoRA (no dropout) is the same."""
    shas = []
    for checkpointing in (False, True):
        out = tmp_path / f"gc-{checkpointing}"
        spec = _spec({"dropout": 0.0}, steps=2, gradient_checkpointing=checkpointing)
        train(spec, tiny_image_model, tiny_image_dataset, out, _ctx(out))
        shas.append(_te_up_weights(out / DIFFUSERS))
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(*shas))
    assert any(w.abs().max().item() > 0 for w in shas[1])


def test_dora_on_the_text_encoder_is_refused_up_front(
    tiny_image_model: Path, tiny_image_dataset: Path, tmp_path: Path
) -> None:
    spec = _spec({"use_dora": True}, steps=1)
    with pytest.raises(InvalidInput, match="lora.use_dora"):
        train(spec, tiny_image_model, tiny_image_dataset, tmp_path, _ctx(tmp_path))
