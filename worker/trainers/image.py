"""The image trainer: a LoRA on a Stable-Diffusion-style UNet, written as diffusers loads it.

Reads top to bottom: threads and seeds → dataset (formats, captions, buckets: worker.datasets)
→ frozen base model → LoRA → work done once (VAE latents per image and flip, cached on the node
and in the bucket; caption embeddings), unless the spec makes them vary per step → denoising
loop (`TrainLoop`: accumulation, schedule, checkpoints, resume) → exports:
`pytorch_lora_weights.safetensors` (diffusers; byte-for-byte the same for the same spec and
thread count), `<name>.safetensors` (kohya, for A1111 / ComfyUI) and `loss.png`. The entrypoint
writes the model card and sidecar and uploads; this module only trains and exports.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from jobspecs.errors import InvalidInput, UserDataError
from jobspecs.models import ImageJobSpec
from worker.context import TrainOutput, WorkerContext
from worker.datasets.image_dataset import ImageTrainSet, build_image_dataset
from worker.datasets.latent_cache import (
    CachePlan,
    LatentCache,
    cache_key,
    cache_plan,
    dataset_digest,
)
from worker.kohya import (
    base_model_version,
    diffusers_to_kohya,
    header_metadata,
    tensor_data_sha256,
)
from worker.plots import draw_loss_curve
from worker.safetensors_io import save_canonical
from worker.trainers.common import (
    TrainLoop,
    build_optimizer,
    pick_device,
    resolve_precision,
    seed_everything,
    spec_fingerprint,
    total_steps,
    window_means,
)

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
LOSS_PNG = "loss.png"
# The safetensors header key diffusers reads the LoRA config from (diffusers.loaders.lora_base
# LORA_ADAPTER_METADATA_KEY); without it, alpha is lost on load and the LoRA plays at scale 1.
ADAPTER_METADATA_KEY = "lora_adapter_metadata"


def train(
    spec: ImageJobSpec, model_dir: Path, data_dir: Path, out_dir: Path, ctx: WorkerContext
) -> TrainOutput:
    """Train the spec's LoRA on `data_dir` over the base model in `model_dir`, into `out_dir`."""
    # Imported here so importing this module (the registry, unit tests) costs torch alone.
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    cfg = spec.training
    started_at = time.time()
    # Results depend on the thread count (float reduction order), so it is part of the job.
    torch.set_num_threads(ctx.threads)
    device = pick_device()
    precision = resolve_precision(cfg.mixed_precision, device)
    base_dtype = precision.base_dtype

    # Bad data fails here, before minutes go into loading a model.
    ds = build_image_dataset(data_dir, spec)
    cache = cache_plan(spec)

    unet = _load(UNet2DConditionModel, model_dir, "unet")
    vae = _load(AutoencoderKL, model_dir, "vae")
    text_encoder = _load(CLIPTextModel, model_dir, "text_encoder")
    tokenizer = _load(CLIPTokenizer, model_dir, "tokenizer")
    noise_scheduler = _load(DDPMScheduler, model_dir, "scheduler")
    if unet.config.get("addition_embed_type") is not None:
        raise UserDataError(
            f"base model {model_dir}: SDXL-style UNets (extra conditioning) are not supported yet"
        )
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
        model.to(device, dtype=base_dtype)
    if base_dtype == torch.float16:
        vae.to(dtype=torch.float32)  # SD VAEs overflow in fp16; it runs once per image anyway
    vae.eval()
    text_encoder.eval()

    target_modules = spec.target_modules()
    lora_config = LoraConfig(
        r=spec.lora.rank,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=target_modules,
        init_lora_weights="gaussian",
        use_dora=spec.lora.use_dora,
        use_rslora=spec.lora.use_rslora,
    )
    seed_everything(cfg.seed)  # the gaussian LoRA init draws from the global generator
    try:
        unet.add_adapter(lora_config)
    except ValueError as err:  # PEFT's "Target modules ... not found in the base model"
        raise InvalidInput(f"lora.target_modules {target_modules}: {err}") from None
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    for p in lora_params:
        p.data = p.data.float()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()

    # Work done once: VAE latents per (image, flip) and caption embeddings per caption, unless
    # the spec makes them vary per step (random crop; caption dropout / tag shuffling).
    encoder = _Encoder(vae, text_encoder, tokenizer, device, base_dtype)
    latents = _cached_latents(ds, cache, encoder, spec, model_dir, ctx) if cache.latents else None
    embeddings = _caption_embeddings(ds, spec, encoder) if cache.text else {}
    del vae, text_encoder
    if cache.latents:
        encoder.vae = None  # not needed again: free the memory for the training loop
    if cache.text:
        encoder.text_encoder = None
    if device.type == "cuda":
        torch.cuda.empty_cache()

    optimizer = build_optimizer(lora_params, cfg, device)
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
            clean = encoder.latents(ds.batch(k).pixels)
        if cache.text:
            context = torch.stack([embeddings[c] for c in plan.captions])
        else:
            context = encoder.captions(list(plan.captions))
        clean, context = clean.to(device), context.to(device, base_dtype)
        noise = torch.randn(clean.shape, generator=noise_gen).to(device)
        timesteps = torch.randint(0, num_timesteps, (len(plan.records),), generator=noise_gen)
        timesteps = timesteps.to(device)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        pred = unet(noisy.to(base_dtype), timesteps, encoder_hidden_states=context).sample
        target = _target(prediction_type, noise_scheduler, clean, noise, timesteps)
        return F.mse_loss(pred.float(), target.float()), {"images": len(plan.records)}

    loop = TrainLoop(
        cfg,
        model=unet,
        optimizer=optimizer,
        precision=precision,
        device=device,
        ctx=ctx,
        total=total,
        generators={"noise": noise_gen},
        fingerprint=spec_fingerprint(spec, ctx.threads),
    )
    result = loop.run(micro_loss)
    finished_at = time.time()

    # Export: diffusers file (deterministic header), kohya file (adds times), loss curve.
    curve_every = max(1, total // 50)
    state = _lora_state(unet)
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
    )
    _save_diffusers(unet, state, out_dir / WEIGHTS_NAME, header_metadata(**meta_args))
    files = [WEIGHTS_NAME]
    kohya_name = f"{spec.name}.safetensors"
    if not spec.lora.use_dora:  # kohya's format has no DoRA magnitudes
        kohya = diffusers_to_kohya(state, spec.lora.alpha, spec.lora.use_rslora)
        meta = header_metadata(**meta_args, started_at=started_at, finished_at=finished_at)
        save_canonical(kohya, out_dir / kohya_name, {"format": "pt", **meta})
        files.append(kohya_name)
    draw_loss_curve(result.losses, out_dir / LOSS_PNG, title=f"{spec.name}: training loss")
    files.append(LOSS_PNG)

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
        },
        resolved={
            "rank": spec.lora.rank,
            "alpha": spec.lora.alpha,
            "dropout": spec.lora.dropout,
            "use_dora": spec.lora.use_dora,
            "use_rslora": spec.lora.use_rslora,
            "target_modules": target_modules,
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


def _trigger(spec: ImageJobSpec) -> str | None:
    """The trigger word of the spec's `data:` section, where it has one."""
    data = getattr(spec, "data", None)
    return getattr(data, "trigger_word", None) if data is not None else None


def _load(cls: Any, model_dir: Path, subfolder: str) -> Any:
    try:
        return cls.from_pretrained(model_dir, subfolder=subfolder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserDataError(f"base model {model_dir}: cannot load {subfolder} ({err})") from None


class _Encoder:
    """The frozen VAE and text encoder, turning pixels and captions into UNet inputs."""

    def __init__(self, vae: Any, text_encoder: Any, tokenizer: Any, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE latents as the UNet sees them (scaled), on the CPU, fp32."""
        scale = self.vae.config.scaling_factor
        shift = self.vae.config.get("shift_factor") or 0.0
        # The distribution's mean rather than a sample: deterministic, and the VAE's std is tiny.
        z = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.mean
        return ((z - shift) * scale).float().cpu()

    @torch.no_grad()
    def captions(self, captions: list[str]) -> torch.Tensor:
        """Text-encoder hidden states of `captions`, on the CPU, fp32."""
        ids = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids.to(self.device))[0].float().cpu()


def _cached_latents(
    ds: ImageTrainSet,
    plan: CachePlan,
    encoder: _Encoder,
    spec: ImageJobSpec,
    model_dir: Path,
    ctx: WorkerContext,
) -> dict[tuple[int, bool], torch.Tensor]:
    """Latents of every (image, flip), encoded once per dataset + VAE: from the node cache,
    else the bucket's (`<bucket>/cache/latents/<key>/`), else encoded here and shared."""
    vae_id = _vae_digest(model_dir)
    key = cache_key(spec, dataset_digest(ds), vae_id)
    cache = LatentCache(ctx.cache_dir / "latents", key)
    storage = None
    if ctx.latent_cache_uri:
        from worker.storage import open_storage

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
    ds: ImageTrainSet, spec: ImageJobSpec, encoder: _Encoder
) -> dict[str, torch.Tensor]:
    """Embeddings of every caption the job will use, when captions do not vary per step (so
    each image's caption, trigger word included, is the same in every epoch)."""
    from worker.datasets.captions import caption_for

    first_item: dict[int, int] = {}
    for item, record in enumerate(ds.items):
        first_item.setdefault(record, item)
    captions = sorted({
        caption_for(ds.records[r].caption, spec.data, spec.training.seed, 0, item)
        for r, item in first_item.items()
    })
    return {c: encoder.captions([c])[0] for c in captions}


def _vae_digest(model_dir: Path) -> str:
    """sha256 over the VAE folder's files: what the latents depend on."""
    import hashlib

    from worker.transfer import sha256_file

    h = hashlib.sha256()
    vae_dir = model_dir / "vae"
    for path in sorted(p for p in vae_dir.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(vae_dir).as_posix()}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()


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


def _lora_state(unet: Any) -> dict[str, torch.Tensor]:
    """The UNet LoRA in diffusers' key format (`unet.<module>.lora.{down,up}.weight`), fp32."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    return {f"unet.{k}": v.detach().to("cpu", torch.float32) for k, v in state.items()}


def _save_diffusers(
    unet: Any, tensors: dict[str, torch.Tensor], path: Path, extra: dict[str, str]
) -> None:
    """Write the UNet LoRA as diffusers' `save_lora_weights` would, but byte-deterministic."""
    # The adapter config, prefixed by component, as diffusers packs it. Sets become sorted lists
    # (diffusers makes them lists in set order, which differs per process).
    config = unet.peft_config["default"].to_dict()
    packed = {f"unet.{k}": sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    metadata = {
        **extra,
        "format": "pt",
        ADAPTER_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True),
    }
    save_canonical(tensors, path, metadata)
