"""The image trainer: a LoRA on a Stable-Diffusion-style UNet, written as diffusers loads it.

Reads top to bottom: threads and seeds → dataset → frozen base model → LoRA → encode the
dataset once (VAE latents and caption embeddings never change, since both models are frozen) →
denoising loop → `pytorch_lora_weights.safetensors`, byte-for-byte the same for the same spec
and thread count. The entrypoint writes the sidecar and uploads; this module only trains.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from jobspecs.errors import InvalidInput, UserDataError
from jobspecs.models import ImageJobSpec
from worker.context import TrainOutput, WorkerContext
from worker.datasets.images import ImageCaptionDataset
from worker.safetensors_io import save_canonical

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
# The safetensors header key diffusers reads the LoRA config from (diffusers.loaders.lora_base
# LORA_ADAPTER_METADATA_KEY); without it, alpha is lost on load and the LoRA plays at scale 1.
ADAPTER_METADATA_KEY = "lora_adapter_metadata"
MAX_GRAD_NORM = 1.0  # what diffusers' LoRA scripts clip to; keeps high learning rates stable
REPORT_EVERY_S = 0.5
ENCODE_BATCH = 8


def train(
    spec: ImageJobSpec, model_dir: Path, data_dir: Path, out_dir: Path, ctx: WorkerContext
) -> TrainOutput:
    """Train the spec's LoRA on `data_dir` over the base model in `model_dir`, into `out_dir`."""
    # Imported here so importing this module (the registry, unit tests) costs torch alone.
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    cfg = spec.training
    # Results depend on the thread count (float reduction order), so it is part of the job.
    torch.set_num_threads(ctx.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The frozen base runs in bf16 on a GPU (half the memory, tensor cores); the LoRA weights
    # and the optimizer stay fp32 either way.
    base_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    # Bad data fails here, before minutes go into loading a model.
    dataset = ImageCaptionDataset(data_dir, cfg.resolution)

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
    vae.eval()
    text_encoder.eval()

    target_modules = spec.target_modules()
    lora_config = LoraConfig(
        r=spec.lora.rank,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=target_modules,
        init_lora_weights="gaussian",
    )
    torch.manual_seed(cfg.seed)  # the gaussian LoRA init draws from the global generator
    try:
        unet.add_adapter(lora_config)
    except ValueError as err:  # PEFT's "Target modules ... not found in the base model"
        raise InvalidInput(f"lora.target_modules {target_modules}: {err}") from None
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    for p in lora_params:
        p.data = p.data.float()
    unet.train()

    latents, embeddings = _encode_once(dataset, vae, text_encoder, tokenizer, device, base_dtype)
    del vae, text_encoder  # no longer needed: free their memory for the training loop
    if device.type == "cuda":
        torch.cuda.empty_cache()

    optimizer = torch.optim.AdamW(lora_params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    prediction_type = noise_scheduler.config.prediction_type
    num_timesteps = noise_scheduler.config.num_train_timesteps
    order = BatchOrder(len(dataset), cfg.batch_size, cfg.seed)
    # Noise and timesteps come from their own CPU generator so they do not depend on the device
    # or on anything else drawing random numbers; the global generator drives LoRA dropout.
    noise_gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    total = cfg.steps
    curve_every = max(1, total // 50)
    first_loss = value = math.nan
    curve: list[float] = []  # mean loss of each window of `curve_every` steps
    window = 0.0
    started = last_report = time.monotonic()
    last_step = 0
    for step in range(1, total + 1):
        idx = order.batch(step - 1)
        clean = latents[idx].to(device)
        context = embeddings[idx].to(device, base_dtype)
        noise = torch.randn(clean.shape, generator=noise_gen).to(device)
        timesteps = torch.randint(0, num_timesteps, (len(idx),), generator=noise_gen).to(device)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        pred = unet(noisy.to(base_dtype), timesteps, encoder_hidden_states=context).sample
        target = _target(prediction_type, noise_scheduler, clean, noise, timesteps)
        loss = F.mse_loss(pred.float(), target.float())

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora_params, MAX_GRAD_NORM)
        optimizer.step()

        value = loss.item()
        if not math.isfinite(value):
            raise InvalidInput(
                f"training.learning_rate {cfg.learning_rate}: loss became {value} at step {step}"
            )
        first_loss = value if step == 1 else first_loss
        window += value
        if step % curve_every == 0 or step == total:
            curve.append(window / (step - curve_every * len(curve)))
            window = 0.0
        now = time.monotonic()
        if now - last_report >= REPORT_EVERY_S or step == total:
            rate = (step - last_step) / max(now - last_report, 1e-9)
            ctx.report({"step": step, "total_steps": total, "loss": value, "it_per_s": rate})
            last_report, last_step = now, step
    train_seconds = time.monotonic() - started

    _save_lora(unet, out_dir / WEIGHTS_NAME)
    return TrainOutput(
        files=[WEIGHTS_NAME],
        metrics={
            "first_loss": first_loss,
            "final_loss": value,
            "loss_curve": curve,
            "loss_curve_every": curve_every,
            "steps": total,
            "images": len(dataset),
            "train_seconds": train_seconds,
        },
        resolved={
            "rank": spec.lora.rank,
            "alpha": spec.lora.alpha,
            "dropout": spec.lora.dropout,
            "target_modules": target_modules,
            "resolution": cfg.resolution,
            "batch_size": cfg.batch_size,
            "learning_rate": cfg.learning_rate,
            "weight_decay": cfg.weight_decay,
            "max_grad_norm": MAX_GRAD_NORM,
            "steps": total,
            "seed": cfg.seed,
            "prediction_type": prediction_type,
            "threads": ctx.threads,
            "device": device.type,
            "base_dtype": str(base_dtype).removeprefix("torch."),
        },
    )


class BatchOrder:
    """Which examples each step trains on: a pure function of (seed, epoch) and the step.

    Steps draw consecutive slices of an endless stream that concatenates one permutation per
    epoch, so a resumed run knows its data from the step number alone, and a batch larger than
    the dataset still works (it spans epochs).
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: dict[int, list[int]] = {}

    def epoch(self, epoch: int) -> list[int]:
        """The example order of one epoch."""
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=gen).tolist()}  # keep one
        return self._perms[epoch]

    def batch(self, step: int) -> list[int]:
        """The example indices of 0-based `step`."""
        start = step * self.batch_size
        return [self.epoch(p // self.n)[p % self.n] for p in range(start, start + self.batch_size)]


def _load(cls: Any, model_dir: Path, subfolder: str) -> Any:
    try:
        return cls.from_pretrained(model_dir, subfolder=subfolder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserDataError(f"base model {model_dir}: cannot load {subfolder} ({err})") from None


@torch.no_grad()
def _encode_once(
    dataset: ImageCaptionDataset,
    vae: Any,
    text_encoder: Any,
    tokenizer: Any,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE latents (scaled as the UNet sees them) and caption embeddings, on the CPU, fp32."""
    scale = vae.config.scaling_factor
    shift = vae.config.get("shift_factor") or 0.0
    latents: list[torch.Tensor] = []
    embeddings: list[torch.Tensor] = []
    for start in range(0, len(dataset), ENCODE_BATCH):
        items = [dataset[i] for i in range(start, min(start + ENCODE_BATCH, len(dataset)))]
        pixels = torch.stack([item.pixels for item in items]).to(device, dtype)
        # The distribution's mean rather than a sample: deterministic, and the VAE's std is tiny.
        z = vae.encode(pixels).latent_dist.mean
        latents.append(((z - shift) * scale).float().cpu())
        ids = tokenizer(
            [item.caption for item in items],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        embeddings.append(text_encoder(ids.to(device))[0].float().cpu())
    return torch.cat(latents), torch.cat(embeddings)


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


def _save_lora(unet: Any, path: Path) -> None:
    """Write the UNet LoRA as diffusers' `save_lora_weights` would, but byte-deterministic."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    tensors = {f"unet.{k}": v.detach().to("cpu", torch.float32) for k, v in state.items()}
    # The adapter config, prefixed by component, as diffusers packs it. Sets become sorted lists
    # (diffusers makes them lists in set order, which differs per process).
    config = unet.peft_config["default"].to_dict()
    packed = {f"unet.{k}": sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    metadata = {"format": "pt", ADAPTER_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
    save_canonical(tensors, path, metadata)
