"""Every image dataset layout trains a LoRA that halves the denoising loss on a learnable set.

The image trainer runs end to end per layout (captions, kohya, imagefolder) on the same flat-
colour images, then the loss is measured twice on the same footing: the base UNet, and the base
UNet with the exported adapter loaded by diffusers (`load_lora_weights`), each on the dataset's
latents with the same fixed noise and the same evenly spaced timesteps — the trainer's own
objective (epsilon MSE under the DDPM forward process), with the timestep noise taken out.

Why these LoRA targets: in the tiny UNet attention exists only at 16x16, so an attention-only
LoRA cannot reach the full-resolution path (conv_in → resnets → skip → conv_out) that carries
the per-pixel noise the objective asks for, and the loss falls ~10% at most. Adding the ResNet
convolutions (LoCon-style, a plain `lora.target_modules` choice) lets it learn to denoise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lorajobs.jobspecs.models import ImageJobSpec
from lorajobs.worker.context import TrainOutput, WorkerContext
from lorajobs.worker.trainers.image.data import build_image_dataset
from lorajobs.worker.trainers.image.recipe import train
from lorajobs.worker.trainers.image.tiny_learnable import COLOURS, LAYOUTS, write_colour_set

pytestmark = pytest.mark.slow

THREADS = 1
STEPS = 40
TARGETS = [
    "conv1",
    "conv2",
    "conv_in",
    "conv_out",
    "conv_shortcut",
    "to_k",
    "to_out.0",
    "to_q",
    "to_v",
]
EVAL_TIMESTEPS = 8  # per image, evenly spaced over the schedule: the uniform training draw


def _spec(layout: str) -> ImageJobSpec:
    return ImageJobSpec.model_validate(
        {
            "kind": "image",
            "name": f"colours-{layout}",
            "base_model": "tiny",
            "dataset": "colours",
            "lora": {"rank": 8, "alpha": 8.0, "target_modules": TARGETS},
            "training": {
                "steps": STEPS,
                "batch_size": 2,
                "resolution": 64,
                "seed": 0,
                "learning_rate": 1e-2,
            },
            "data": {"format": layout},
        }
    )


@pytest.fixture(scope="module", params=LAYOUTS)
def trained(
    request: pytest.FixtureRequest,
    tiny_image_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[str, Path, Path, TrainOutput]:
    """(layout, dataset, adapter folder, trainer output) for one layout."""
    layout = request.param
    root = tmp_path_factory.mktemp(f"colours-{layout}")
    data = write_colour_set(root / "data", layout)
    out = root / "out"
    out.mkdir()
    ctx = WorkerContext(
        job_id=layout, output_uri="file:///unused", cache_dir=root / "cache", threads=THREADS
    )
    return layout, data, out, train(_spec(layout), tiny_image_model, data, out, ctx)


@torch.no_grad()
def _eval_loss(pipe: Any, latents: torch.Tensor, context: torch.Tensor) -> float:
    """Mean epsilon MSE over every (image, timestep) pair, with noise fixed by a seed."""
    sched = pipe.scheduler
    assert sched.config.prediction_type == "epsilon"  # the tiny model's; the target is the noise
    n = len(latents)
    steps = torch.linspace(0, sched.config.num_train_timesteps - 1, EVAL_TIMESTEPS).long()
    t = steps.repeat(n)
    z = latents.repeat_interleave(EVAL_TIMESTEPS, 0)
    c = context.repeat_interleave(EVAL_TIMESTEPS, 0)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(1234))
    pred = pipe.unet(sched.add_noise(z, noise, t), t, encoder_hidden_states=c).sample
    return float(torch.nn.functional.mse_loss(pred, noise))


def test_every_layout_halves_the_denoising_loss(
    trained: tuple[str, Path, Path, TrainOutput], tiny_image_model: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(THREADS)
    layout, data, out, result = trained
    spec = _spec(layout)
    ds = build_image_dataset(data, spec)
    assert len(ds.records) == len(COLOURS)
    assert len(ds) == len(COLOURS) * (2 if layout == "kohya" else 1)  # kohya: 2_colour repeats

    pipe = StableDiffusionPipeline.from_pretrained(tiny_image_model, local_files_only=True)
    with torch.no_grad():  # the trainer's inputs: VAE mean latents, scaled; full CLIP states
        pixels = torch.stack([ds.load(r, False) for r in range(len(ds.records))])
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(
            [r.caption for r in ds.records],
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        context = pipe.text_encoder(ids)[0]

    before = _eval_loss(pipe, latents, context)
    pipe.load_lora_weights(out)
    (config,) = pipe.unet.peft_config.values()
    assert sorted(config.target_modules) == TARGETS and config.r == 8 and config.lora_alpha == 8
    after = _eval_loss(pipe, latents, context)
    # The kohya file holds the same adapter, so the same loss through it. (A diffusers file
    # mixing PEFT `lora_A` and diffusers `lora.down` key names loads with part of its LoRA
    # silently dropped: diffusers picks the naming from the first key.)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(out, weight_name=f"{spec.name}.safetensors")
    assert _eval_loss(pipe, latents, context) == pytest.approx(after, abs=1e-5)

    curve = result.metrics["loss_curve"]  # one value per step below 50 steps
    assert result.metrics["loss_curve_every"] == 1 and len(curve) == STEPS
    first, last = np.mean(curve[:5]), np.mean(curve[-10:])
    assert after < 0.5 * before, (before, after)
    assert last < 0.5 * first, (first, last)
