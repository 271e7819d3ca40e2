"""The Flux loops `bench/trainer.py` times: lorajobs' trainer on a tiny Flux.1 pipeline and the
bare flow-matching loop a user would write for the same work (diffusers' Flux LoRA script,
stripped): LoRA on the transformer (lorajobs' default Flux targets and init), AdamW without
weight decay, clipping at 1.0, batch 2 in a per-epoch shuffled order, uniform sigma, guidance
1.0, velocity MSE on packed latents.

`encode_every_step`: every step decodes its image files, resizes and crops them, VAE-encodes
them (shift and scale) and runs T5 and CLIP on the captions, as diffusers' Flux script does
without its cache flags; else all of it happens once, as lorajobs' cache does.

Measured 2026-12-04 on the 2-core shared build machine, 1 thread, 64 px, medians (the machine
was busy: wall figures carry the neighbours): per step (pair 10, 300 steps, separate
processes) 25.5 vs 23.9 ms CPU (1.07x), 34.0 vs 31.9 ms wall; alternating in one process (pair
12) paired CPU ratio 1.006, wall 1.06; multi-epoch job (pair 11, 100 epochs = 400 steps) whole
job 14.5 vs 28.4 s CPU (0.51x), 28.9 vs 55.5 s wall (0.52x), the bare step spending 56% of its
time decoding and encoding. The tiny T5 is cheap: with FLUX.1's T5-XXL the encode share, and
what the cache saves, is far larger.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from loops import LR, T0, Clock, _ctx, _decode, _rss_mb  # bench/, beside this

FLUX_RESOLUTION = 64


def lorajobs_flux(fx: dict[str, str], steps: int, threads: int, epochs: int | None) -> dict:
    from lorajobs.jobspecs.models import ImageJobSpec
    from lorajobs.worker.trainers.image.recipe import train

    training: dict[str, Any] = {
        "batch_size": 2,
        "resolution": FLUX_RESOLUTION,
        "learning_rate": LR,
        "checkpoint_every": 0,
        "timestep_sampling": "uniform",
        "guidance_scale": 1.0,
    }
    training.update({"epochs": epochs} if epochs else {"steps": steps})
    spec = ImageJobSpec(
        kind="image",
        name="bench",
        base_model="m",
        dataset="d",
        lora={"rank": 4, "alpha": 8},
        training=training,
    )
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        out = train(
            spec,
            Path(fx["flux_model"]),
            Path(fx["image_data"]),
            Path(tmp),
            _ctx(Path(tmp), threads, clock),
        )
    return {
        **clock.figures(),
        "steps": out.metrics["steps"],
        "job_wall_s": time.monotonic() - T0,
        "job_cpu_s": time.process_time(),
        "peak_rss_mb": _rss_mb(),
    }


def bare_flux(
    fx: dict[str, str],
    steps: int,
    threads: int,
    epochs: int | None,
    encode_every_step: bool = False,
) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

    from lorajobs.worker.trainers.image.flux import default_targets

    torch.set_num_threads(threads)
    m = Path(fx["flux_model"])
    kw: dict[str, Any] = {"local_files_only": True}
    transformer = FluxTransformer2DModel.from_pretrained(m, subfolder="transformer", **kw)
    vae = AutoencoderKL.from_pretrained(m, subfolder="vae", **kw)
    clip = CLIPTextModel.from_pretrained(m, subfolder="text_encoder", **kw)
    t5 = T5EncoderModel.from_pretrained(m, subfolder="text_encoder_2", **kw)
    tok = CLIPTokenizer.from_pretrained(m, subfolder="tokenizer", **kw)
    tok2 = AutoTokenizer.from_pretrained(m, subfolder="tokenizer_2", **kw)
    for mod in (transformer, vae, clip, t5):
        mod.requires_grad_(False)
    torch.manual_seed(0)
    transformer.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=8,
            init_lora_weights="gaussian",
            target_modules=default_targets(dict(transformer.config)),
        )
    )
    params = [p for p in transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    files = sorted(Path(fx["image_data"]).glob("*.png"))
    captions = [f.with_suffix(".txt").read_text(encoding="utf-8").strip() for f in files]
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor

    def ids(tk: Any, texts: list[str], length: int) -> Any:
        return tk(
            texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids

    @torch.no_grad()
    def encode(idx: list[int]) -> tuple[Any, Any, Any]:
        pixels = torch.stack([_decode(files[i], FLUX_RESOLUTION) for i in idx])
        z = (vae.encode(pixels).latent_dist.mean - shift) * scale
        texts = [captions[i] for i in idx]
        pooled = clip(ids(tok, texts, tok.model_max_length)).pooler_output
        context = t5(ids(tok2, texts, tok2.model_max_length))[0]
        return z, context, pooled

    if not encode_every_step:
        all_z, all_c, all_p = encode(list(range(len(files))))
    n_steps = epochs * (len(files) // 2) if epochs else steps
    gen = torch.Generator().manual_seed(0)
    transformer.train()
    clock = Clock()
    clock.tick(0, n_steps)
    encode_cpu, loop_start = 0.0, time.process_time()
    for step in range(n_steps):
        epoch, pos = divmod(step * 2, len(files))
        perm = torch.randperm(len(files), generator=torch.Generator().manual_seed(epoch)).tolist()
        idx = perm[pos : pos + 2]
        if encode_every_step:
            c0 = time.process_time()
            clean, context, pooled = encode(idx)
            encode_cpu += time.process_time() - c0
        else:
            clean, context, pooled = all_z[idx], all_c[idx], all_p[idx]
        b, c, h, w = clean.shape
        noise = torch.randn(clean.shape, generator=gen)
        sigmas = torch.rand(b, generator=gen)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = FluxPipeline._pack_latents((1 - s) * clean + s * noise, b, c, h, w)
        pred = transformer(
            hidden_states=noisy,
            encoder_hidden_states=context,
            pooled_projections=pooled,
            timestep=sigmas,
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", clean.dtype),
            txt_ids=torch.zeros(context.shape[1], 3),
            guidance=torch.full((b,), 1.0),
            return_dict=False,
        )[0]
        target = FluxPipeline._pack_latents(noise - clean, b, c, h, w)
        loss = F.mse_loss(pred.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        clock.tick(step + 1, n_steps)
    loop_cpu = time.process_time() - loop_start
    with tempfile.TemporaryDirectory() as tmp:
        save_file(
            {k: v.contiguous() for k, v in get_peft_model_state_dict(transformer).items()},
            str(Path(tmp) / "lora.safetensors"),
        )
    return {
        **clock.figures(),
        "steps": n_steps,
        "job_wall_s": time.monotonic() - T0,
        "job_cpu_s": time.process_time(),
        "peak_rss_mb": _rss_mb(),
        "encode_share": encode_cpu / max(loop_cpu, 1e-9),
    }
