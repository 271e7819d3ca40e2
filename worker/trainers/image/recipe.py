"""The image trainer: a LoRA on a Stable-Diffusion-style UNet (SD-1.x/2.x or SDXL), and
optionally on its text encoder(s), written as diffusers loads it.

Reads top to bottom: threads and seeds → dataset (formats, captions, buckets: worker.datasets)
→ frozen base model (worker.trainers.image_models) → LoRA → work done once (VAE latents per
image and flip, cached on the node and in the bucket; caption embeddings), unless the spec makes
them vary per step or trains the text encoders → denoising loop (`TrainLoop`: accumulation,
schedule, checkpoints, resume) with optional offset noise and min-SNR weighting → exports:
`pytorch_lora_weights.safetensors` (diffusers; byte-for-byte the same for the same spec and
thread count), `<name>.safetensors` (kohya, for A1111 / ComfyUI) and `loss.png`. The entrypoint
writes the model card and sidecar and uploads; this module only trains and exports.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lorajobs.jobspecs.failures import InvalidInput, UserDataError
from lorajobs.jobspecs.models import ImageJobSpec, LoraSettings
from lorajobs.worker.context import TrainOutput, WorkerContext
from lorajobs.worker.trainers.image.data import ImageTrainSet, build_image_dataset
from lorajobs.worker.trainers.image.latents import (
    CachePlan,
    LatentCache,
    cache_key,
    cache_plan,
    dataset_digest,
)
from lorajobs.worker.trainers.image.kohya import (
    base_model_version,
    diffusers_to_kohya,
    header_metadata,
    tensor_data_sha256,
)
from lorajobs.worker.plots import draw_loss_curve
from lorajobs.worker.safetensors_io import save_canonical
from lorajobs.worker.trainers.image.samples import SampleRenderer
from lorajobs.worker.sidecar import hash_cache_for, tree_digest
from lorajobs.worker.trainers.loop import (
    TrainLoop,
    build_optimizer,
    pick_device,
    resolve_precision,
    seed_everything,
    spec_fingerprint,
    to_device,
    total_steps,
    window_means,
)
from lorajobs.worker.trainers.image.models import (
    TEXT_ENCODER_TARGETS,
    Conditioning,
    Encoders,
    add_text_encoder_lora,
    checkpoint_text_encoder,
    freeze,
    load_image_base,
    lora_state,
    save_diffusers,
)

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
LOSS_PNG = "loss.png"


def train(
    spec: ImageJobSpec, model_dir: Path, data_dir: Path, out_dir: Path, ctx: WorkerContext
) -> TrainOutput:
    """Train the spec's LoRA on `data_dir` over the base model in `model_dir`, into `out_dir`."""
    cfg = spec.training
    started_at = time.time()
    if cfg.train_text_encoder and spec.lora.use_dora:
        # transformers' adapter loader (which diffusers' load_lora_weights uses for text
        # encoders) drops DoRA magnitudes: the adapter would not load back as trained.
        raise InvalidInput(
            "lora.use_dora: DoRA text-encoder weights do not load back into diffusers "
            "pipelines; use plain LoRA with training.train_text_encoder, or train the UNet only"
        )
    # Results depend on the thread count (float reduction order), so it is part of the job.
    torch.set_num_threads(ctx.threads)
    device = pick_device()
    precision = resolve_precision(cfg.mixed_precision, device)
    base_dtype = precision.base_dtype

    # Bad data fails here, before minutes go into loading a model.
    ds = build_image_dataset(data_dir, spec)
    cache = cache_plan(spec)

    base = load_image_base(model_dir)
    freeze(base, device, base_dtype)
    unet, noise_scheduler = base.unet, base.scheduler

    # LoRA: the UNet's first, then each text encoder's, all from the seeded global generator
    # (the gaussian init draws from it), so a UNet-only job's LoRA is the same with or without
    # the text-encoder code path.
    target_modules = spec.target_modules()
    seed_everything(cfg.seed)
    try:
        unet.add_adapter(_lora_config(spec.lora, target_modules))
    except ValueError as err:  # PEFT's "Target modules ... not found in the base model"
        raise InvalidInput(f"lora.target_modules {target_modules}: {err}") from None
    trained: dict[str, Any] = {"unet": unet}  # diffusers component name → model with LoRA
    if cfg.train_text_encoder:
        for name, te in base.text_encoders.items():
            add_text_encoder_lora(te, _lora_config(spec.lora, TEXT_ENCODER_TARGETS))
            trained[name] = te
    lora_params = {name: [p for p in m.parameters() if p.requires_grad]
                   for name, m in trained.items()}
    for params in lora_params.values():
        for p in params:
            p.data = p.data.float()
    for name, module in trained.items():
        if cfg.gradient_checkpointing:
            if name == "unet":
                module.enable_gradient_checkpointing()
            else:
                checkpoint_text_encoder(module)
        module.train()
    # Validation grids (`samples:`), rendered by the training modules; the folder is checked now.
    renderer = SampleRenderer.for_spec(
        spec, model_dir, out_dir, unet=unet, precision=precision, device=device,
        text_encoders={k: m for k, m in trained.items() if k != "unet"},
    )

    # Work done once: VAE latents per (image, flip) and caption embeddings per caption, unless
    # the spec makes them vary per step (random crop; caption dropout / tag shuffling; a text
    # encoder that trains).
    encoders = Encoders(base, device, base_dtype)
    latents = _cached_latents(ds, cache, encoders, spec, model_dir, ctx) if cache.latents else None
    embeddings = _caption_embeddings(ds, spec, encoders) if cache.text else {}
    if cache.latents:
        encoders.vae = base.vae = None  # not needed again: free the memory for the loop
    if cache.text:
        encoders.text_encoders = None
        base.text_encoders = {}
    if device.type == "cuda":
        torch.cuda.empty_cache()

    te_lr = cfg.text_encoder_learning_rate or cfg.learning_rate
    if cfg.train_text_encoder:
        optimizer = build_optimizer(
            [{"params": ps, "peak_lr": cfg.learning_rate if name == "unet" else te_lr}
             for name, ps in lora_params.items()],
            cfg,
            device,
        )
    else:
        optimizer = build_optimizer(lora_params["unet"], cfg, device)
    prediction_type = noise_scheduler.config.prediction_type
    num_timesteps = noise_scheduler.config.num_train_timesteps
    # Noise and timesteps come from their own CPU generator so they do not depend on the device
    # or on anything else drawing random numbers; the global generator drives LoRA dropout.
    noise_gen = torch.Generator().manual_seed(cfg.seed)
    seed_everything(cfg.seed)
    total = total_steps(cfg, len(ds), batches_per_epoch=ds.steps_per_epoch)

    def micro_loss(k: int) -> tuple[torch.Tensor, dict[str, int]]:
        """The denoising loss of micro-batch `k` (its images: a function of k and the seed)."""
        plan = ds.plan(k)
        if latents is not None:
            clean = torch.stack([latents[r, f] for r, f in zip(plan.records, plan.flipped)])
        else:
            clean = encoders.latents(ds.batch(k).pixels)
        if cache.text:
            cond = Conditioning.stack([embeddings[c] for c in plan.captions])
        elif cfg.train_text_encoder:
            cond = encoders.condition(list(plan.captions))  # with gradients into the LoRA
        else:
            cond = encoders.captions(list(plan.captions))
        noise = torch.randn(clean.shape, generator=noise_gen)
        if cfg.noise_offset > 0:  # only then: the draw would shift every later one
            noise = noise + cfg.noise_offset * torch.randn(
                (clean.shape[0], clean.shape[1], 1, 1), generator=noise_gen
            )
        timesteps = torch.randint(0, num_timesteps, (len(plan.records),), generator=noise_gen)
        host = {"clean": clean, "context": cond.context, "noise": noise, "timesteps": timesteps}
        if base.sdxl:
            assert cond.pooled is not None
            host["pooled"] = cond.pooled
            host["time_ids"] = torch.tensor(ds.size_conditioning(plan), dtype=base_dtype)
        # One queued copy per tensor: the host does not wait for the device's previous step.
        on = to_device(host, device)
        clean, noise, timesteps = on["clean"], on["noise"], on["timesteps"]
        context = on["context"].to(base_dtype)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        added = None
        if base.sdxl:
            added = {"text_embeds": on["pooled"].to(base_dtype), "time_ids": on["time_ids"]}
        pred = unet(
            noisy.to(base_dtype), timesteps, encoder_hidden_states=context,
            added_cond_kwargs=added,
        ).sample
        target = _target(prediction_type, noise_scheduler, clean, noise, timesteps)
        if cfg.min_snr_gamma is None:
            loss = F.mse_loss(pred.float(), target.float())
        else:
            per_item = F.mse_loss(pred.float(), target.float(), reduction="none")
            per_item = per_item.mean(dim=list(range(1, per_item.ndim)))
            # On the device (add_noise moved alphas_cumprod there): no read-back. Indexing and
            # one IEEE division: the same values as on the CPU.
            snr = snr_at(noise_scheduler.alphas_cumprod, timesteps)
            loss = (per_item * min_snr_weights(snr, cfg.min_snr_gamma, prediction_type)).mean()
        return loss, {"images": len(plan.records)}

    # One module for the loop: its trainable parameters are what checkpoints hold. A UNet-only
    # job passes the UNet itself, so its checkpoints keep their parameter names.
    model = unet if len(trained) == 1 else torch.nn.ModuleDict(trained)
    loop = TrainLoop(
        cfg,
        model=model,
        optimizer=optimizer,
        precision=precision,
        device=device,
        ctx=ctx,
        total=total,
        generators={"noise": noise_gen},
        fingerprint=spec_fingerprint(spec, ctx.threads),
    )
    result = loop.run(micro_loss, on_step=renderer.on_step if renderer else None)
    finished_at = time.time()

    # Export: diffusers file (deterministic header), kohya file (adds times), loss curve.
    curve_every = max(1, total // 50)
    state: dict[str, torch.Tensor] = {}
    for name, module in trained.items():
        state.update(lora_state(module, name))
    tensors_sha = tensor_data_sha256(state)
    meta_args: dict[str, Any] = dict(
        name=spec.name,
        rank=spec.lora.rank,
        alpha=spec.lora.alpha,
        use_rslora=spec.lora.use_rslora,
        unet_config=dict(unet.config),
        steps=total,
        seed=cfg.seed,
        learning_rate=cfg.learning_rate,
        resolution=cfg.resolution,
        captions=[r.caption for r in ds.records],
        dataset=spec.dataset,
        trigger=_trigger(spec),
        tensors_sha256=tensors_sha,
        text_encoder_lr=te_lr if cfg.train_text_encoder else None,
    )
    save_diffusers(state, trained, out_dir / WEIGHTS_NAME, header_metadata(**meta_args))
    files = [WEIGHTS_NAME]
    kohya_name = f"{spec.name}.safetensors"
    if not spec.lora.use_dora:  # kohya's format has no DoRA magnitudes
        kohya = diffusers_to_kohya(state, spec.lora.alpha, spec.lora.use_rslora, base.sdxl)
        meta = header_metadata(**meta_args, started_at=started_at, finished_at=finished_at)
        save_canonical(kohya, out_dir / kohya_name, {"format": "pt", **meta})
        files.append(kohya_name)
    draw_loss_curve(result.losses, out_dir / LOSS_PNG, title=f"{spec.name}: training loss")
    files.append(LOSS_PNG)
    sample_files, sample_metrics = renderer.finish(total) if renderer else ([], {})
    files += sample_files

    losses = result.losses
    return TrainOutput(
        files=files,
        deterministic=[WEIGHTS_NAME],
        metrics={
            "first_loss": losses[0],
            "final_loss": losses[-1],
            "loss_curve": window_means(losses, curve_every),
            "loss_curve_every": curve_every,
            "steps": total,
            "images": len(ds.records),
            "items_per_epoch": len(ds),
            "images_seen": total * cfg.batch_size * cfg.gradient_accumulation_steps,
            "latents_cached": cache.latents,
            "text_cached": cache.text,
            "resumed_from_step": result.resumed_from_step,
            "train_seconds": result.train_seconds,
            **sample_metrics,
        },
        resolved={
            "model_family": base.family,
            "rank": spec.lora.rank,
            "alpha": spec.lora.alpha,
            "dropout": spec.lora.dropout,
            "use_dora": spec.lora.use_dora,
            "use_rslora": spec.lora.use_rslora,
            "target_modules": target_modules,
            "train_text_encoder": cfg.train_text_encoder,
            "text_encoder_learning_rate": te_lr if cfg.train_text_encoder else None,
            "text_encoder_target_modules": (
                TEXT_ENCODER_TARGETS if cfg.train_text_encoder else None
            ),
            "resolution": cfg.resolution,
            "batch_size": cfg.batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "learning_rate": cfg.learning_rate,
            "lr_scheduler": cfg.lr_scheduler,
            "warmup_steps": cfg.warmup_steps,
            "weight_decay": cfg.weight_decay,
            "max_grad_norm": cfg.max_grad_norm,
            "optimizer": cfg.optimizer,
            "mixed_precision": precision.used,
            "mixed_precision_requested": precision.requested,
            "gradient_checkpointing": cfg.gradient_checkpointing,
            "noise_offset": cfg.noise_offset,
            "min_snr_gamma": cfg.min_snr_gamma,
            "steps": total,
            "epochs": round(total * cfg.gradient_accumulation_steps / ds.steps_per_epoch, 3),
            "bucketing": spec.data.bucketing,
            "seed": cfg.seed,
            "prediction_type": prediction_type,
            "threads": ctx.threads,
            "device": device.type,
            "base_dtype": str(base_dtype).removeprefix("torch."),
            "base_model_version": base_model_version(dict(unet.config))[0],
            "kohya_file": kohya_name if kohya_name in files else None,
            "trigger_phrase": meta_args["trigger"],
        },
    )


def _lora_config(lora: LoraSettings, target_modules: list[str]) -> Any:
    """The spec's LoRA settings on `target_modules`."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules,
        init_lora_weights="gaussian",
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
    )


def snr_at(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) of each timestep, fp32."""
    a = alphas_cumprod.to(torch.float32)[timesteps]
    return a / (1.0 - a)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023) per sample, as diffusers' training scripts
    apply them: min(SNR, γ) / SNR for epsilon, min(SNR, γ) / (SNR + 1) for v-prediction, and
    min(SNR, γ) for a model that predicts the clean sample."""
    if prediction_type == "epsilon":
        # = min(SNR, γ) / SNR, but 1 rather than 0/0 where SNR is 0 (zero-terminal-SNR schedules)
        return torch.clamp(gamma / snr, max=1.0)
    if prediction_type == "v_prediction":
        return torch.clamp(snr, max=gamma) / (snr + 1.0)
    if prediction_type == "sample":
        return torch.clamp(snr, max=gamma)
    raise UserDataError(f"base model scheduler: unsupported prediction_type {prediction_type!r}")


def _trigger(spec: ImageJobSpec) -> str | None:
    """The trigger word of the spec's `data:` section, where it has one."""
    data = getattr(spec, "data", None)
    return getattr(data, "trigger_word", None) if data is not None else None


def _cached_latents(
    ds: ImageTrainSet,
    plan: CachePlan,
    encoder: Encoders,
    spec: ImageJobSpec,
    model_dir: Path,
    ctx: WorkerContext,
) -> dict[tuple[int, bool], torch.Tensor]:
    """Latents of every (image, flip), encoded once per dataset + VAE: from the node cache,
    else the bucket's (`<bucket>/cache/latents/<key>/`), else encoded here and shared."""
    # The VAE's weights and the dtype it runs in (bf16 latents are not fp32 latents).
    # The digest reuses the node's hash cache, as the sidecar's does: no re-read per job.
    vae_dir = model_dir / "vae"
    vae_digest = tree_digest(vae_dir, hash_cache=hash_cache_for(ctx.cache_dir, vae_dir))
    vae_id = f"{vae_digest}:{str(encoder.vae.dtype).removeprefix('torch.')}"
    key = cache_key(spec, dataset_digest(ds), vae_id)
    cache = LatentCache(ctx.cache_dir / "latents", key)
    storage = None
    if ctx.latent_cache_uri:
        from lorajobs.storage.backends import open_storage

        storage = open_storage(ctx.latent_cache_uri)
        if not cache.complete(len(ds.records), plan.flips):
            cache.download(storage)
    out: dict[tuple[int, bool], torch.Tensor] = {}
    encoded = 0
    for record in range(len(ds.records)):
        for flipped in plan.flips:
            stored = cache.get(record, flipped)
            if stored is None or "latents" not in stored:
                z = encoder.latents(ds.load(record, flipped).unsqueeze(0))[0]
                cache.put(record, flipped, {"latents": z})
                encoded += 1
            else:
                z = stored["latents"]
            out[record, flipped] = z
    if storage is not None and encoded:
        cache.upload(storage)
    return out


def _caption_embeddings(
    ds: ImageTrainSet, spec: ImageJobSpec, encoder: Encoders
) -> dict[str, Conditioning]:
    """Embeddings of every caption the job will use, when captions do not vary per step (so
    each image's caption, trigger word included, is the same in every epoch)."""
    from lorajobs.worker.trainers.image.captions import caption_for

    first_item: dict[int, int] = {}
    for item, record in enumerate(ds.items):
        first_item.setdefault(record, item)
    captions = sorted({
        caption_for(ds.records[r].caption, spec.data, spec.training.seed, 0, item)
        for r, item in first_item.items()
    })
    return {c: encoder.captions([c])[0] for c in captions}


def _target(
    prediction_type: str,
    scheduler: Any,
    clean: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    if prediction_type == "sample":
        return clean
    raise UserDataError(f"base model scheduler: unsupported prediction_type {prediction_type!r}")
