"""The image section of `bench/gpu_check.py`: SD 1.5's UNet at 512 px, LoRA r=16 on the
attention projections, batch 2 — lorajobs' image trainer vs the bare diffusers + PEFT loop
(`bench/loops.py`'s `bare_image`, on the GPU in bf16: frozen base in bf16, LoRA in fp32 under
bf16 autocast, as diffusers' LoRA scripts train; latents and caption embeddings encoded once,
as lorajobs caches them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from gpu_sections import (
    IMAGE_TARGETS,
    LR,
    RANK,
    SD15_UNET,
    Setup,
    _reset_peak,
    compare,
    run_ours,
    timed_loop,
)
from sd_proportions import BENCH_VAE

BATCH = 2


def build_sd15_folder(s: Setup) -> tuple[Path, Path, int]:
    """(pipeline folder, image folder, resolution). Full: the tiny pipeline's tokenizer and
    scheduler with SD 1.5's UNet, a CLIP-L-wide (768) 2-layer text encoder and an 8x VAE
    (4 levels, narrow: it encodes each image once, outside the timed steps). Tiny: the test
    suite's tiny pipeline at 64 px."""
    from lorajobs.worker.trainers.image.tiny import (
        _build_tokenizer,
        _clip_config,
        build_tiny_image_model,
        make_image_dataset,
    )

    root = s.work / "sd15"
    model, data = build_tiny_image_model(root / "model"), root / "data"
    resolution = 64 if s.tiny else 512
    make_image_dataset(data, n=8, size=resolution)
    if s.tiny:
        return model, data, resolution
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    with torch.device(s.device):  # random init on the GPU: seconds, not a minute
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            scaling_factor=0.18215,
            **{**BENCH_VAE, "sample_size": 512},
        )
        te = CLIPTextModel(_clip_config(_build_tokenizer(), hidden_size=768, projection_dim=768))
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", te)):
        shutil.rmtree(model / name)
        module.to(torch.bfloat16).save_pretrained(model / name)
    del unet, vae, te
    return model, data, resolution


def ours(s: Setup, model: Path, data: Path, resolution: int) -> dict[str, Any]:
    from lorajobs.jobspecs.models import ImageJobSpec

    spec = ImageJobSpec(
        kind="image",
        name="gpu-check",
        base_model="m",
        dataset="d",
        lora={"rank": RANK, "alpha": RANK},
        training={
            "steps": s.warmup + 2 * s.steps,
            "batch_size": BATCH,
            "resolution": resolution,
            "learning_rate": LR,
            "checkpoint_every": 0,
            "mixed_precision": "bf16",
        },
    )
    return run_ours(s, "image", spec, model, data)


def bare(s: Setup, model: Path, data: Path, resolution: int) -> dict[str, Any]:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from loops import _decode  # the CPU bench's image decode, the same transform
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    _reset_peak(s)
    kw: dict[str, Any] = {"local_files_only": True, "torch_dtype": s.dtype}
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", **kw).to(s.device)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae", **kw).to(s.device)
    te = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", **kw).to(s.device)
    tok = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", local_files_only=True)
    sched = DDPMScheduler.from_pretrained(model, subfolder="scheduler", local_files_only=True)
    for m in (unet, vae, te):
        m.requires_grad_(False)
    torch.manual_seed(0)
    unet.add_adapter(
        LoraConfig(
            r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=IMAGE_TARGETS
        )
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # diffusers' cast_training_params: LoRA trains in fp32
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    files = sorted(data.glob("*.png"))
    captions = [f.with_suffix(".txt").read_text(encoding="utf-8").strip() for f in files]
    with torch.no_grad():
        pixels = torch.stack([_decode(f, resolution) for f in files]).to(s.device, s.dtype)
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        ids = tok(
            captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        context = te(ids.to(s.device))[0]
    alphas = sched.alphas_cumprod.to(s.device)
    gen = torch.Generator(s.device).manual_seed(0)
    unet.train()

    def step() -> None:
        idx = torch.randint(0, len(files), (BATCH,), device=s.device, generator=gen)
        clean, ctx = latents[idx], context[idx]
        noise = torch.randn(clean.shape, device=s.device, dtype=clean.dtype, generator=gen)
        t = torch.randint(0, 1000, (BATCH,), device=s.device, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = (a.sqrt() * clean.float() + (1 - a).sqrt() * noise.float()).to(s.dtype)
        with s.autocast():
            pred = unet(noisy, t, encoder_hidden_states=ctx).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the loss a user's loop logs every step

    return timed_loop(s, step, 2 * s.steps)


def image(s: Setup) -> dict[str, Any]:
    model, data, resolution = build_sd15_folder(s)
    unet_config = json.loads((model / "unet" / "config.json").read_text())
    res = compare(ours(s, model, data, resolution), bare(s, model, data, resolution))
    res["unet_block_out_channels"] = unet_config["block_out_channels"]
    res["resolution"] = resolution
    res["batch"] = BATCH
    return res
