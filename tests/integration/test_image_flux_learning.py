"""A Flux LoRA halves the flow-matching loss on a learnable set.

The trainer runs on flat-colour images (tiny_learnable), then the real objective (velocity
noise - x_0 at x_t = (1 - sigma) x_0 + sigma noise, `flux.flow_loss`) is measured twice with the
same fixed noise and the same evenly spaced sigmas: the base transformer, and the base with the
exported adapter loaded by diffusers (`FluxPipeline.load_lora_weights`). Inputs come from the
pipeline itself (`encode_prompt`, the VAE with its shift and scale), not from the trainer.

Why these targets: the tiny transformer's residual stream enters and leaves through fixed
random projections (x_embedder, proj_out), so block-only LoRAs of low rank cannot undo them and
the loss falls ~35% at most; adding both (a plain `lora.target_modules` choice, as LoCon
targets for SD) lets the LoRA learn the velocity.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorajobs.jobspecs.models import ImageJobSpec
from lorajobs.worker.context import WorkerContext
from lorajobs.worker.trainers.image.data import build_image_dataset
from lorajobs.worker.trainers.image.flux import DOUBLE_TARGETS, flow_loss
from lorajobs.worker.trainers.image.recipe import train
from lorajobs.worker.trainers.image.tiny_learnable import write_colour_set

pytestmark = pytest.mark.slow

TARGETS = sorted([*DOUBLE_TARGETS, "proj_mlp", "proj_out", "x_embedder"])
SIGMAS = 8  # per image, evenly spaced in (0, 1)


def test_flux_lora_halves_the_flow_matching_loss(tiny_flux_model: Path, tmp_path: Path) -> None:
    from diffusers import FluxPipeline

    torch.set_num_threads(1)
    data = write_colour_set(tmp_path / "data", "captions", size=32)
    spec = ImageJobSpec.model_validate(
        {
            "kind": "image",
            "name": "colours",
            "base_model": "tiny-flux",
            "dataset": "colours",
            "lora": {"rank": 32, "alpha": 32.0, "target_modules": TARGETS},
            "training": {"steps": 60, "batch_size": 2, "resolution": 32, "learning_rate": 1e-2},
        }
    )
    out = tmp_path / "out"
    out.mkdir()
    ctx = WorkerContext(job_id="l", output_uri=out.as_uri(), cache_dir=tmp_path / "c", threads=1)
    result = train(spec, tiny_flux_model, data, out, ctx)
    assert result.resolved["kohya_skipped"] == "proj_out has no kohya / ComfyUI name"

    pipe = FluxPipeline.from_pretrained(tiny_flux_model, local_files_only=True)
    ds = build_image_dataset(data, spec)
    with torch.no_grad():
        pixels = torch.stack([ds.load(r, False) for r in range(len(ds.records))])
        vae = pipe.vae.config
        z = (pipe.vae.encode(pixels).latent_dist.mean - vae.shift_factor) * vae.scaling_factor
        context, pooled, _ = pipe.encode_prompt(
            [r.caption for r in ds.records], prompt_2=None, max_sequence_length=32
        )
    n = len(z)
    clean = z.repeat_interleave(SIGMAS, 0)
    on = {
        "clean": clean,
        "noise": torch.randn(clean.shape, generator=torch.Generator().manual_seed(1234)),
        "sigmas": torch.linspace(0.05, 0.95, SIGMAS).repeat(n),
        "context": context.repeat_interleave(SIGMAS, 0),
        "pooled": pooled.repeat_interleave(SIGMAS, 0),
    }
    with torch.no_grad():
        before = float(flow_loss(pipe.transformer, on, torch.float32, 1.0))
        pipe.load_lora_weights(out)
        after = float(flow_loss(pipe.transformer, on, torch.float32, 1.0))
    assert after < 0.5 * before, (before, after)
    curve = result.metrics["loss_curve"]
    assert sum(curve[-10:]) / 10 < 0.6 * sum(curve[:5]) / 5, curve
