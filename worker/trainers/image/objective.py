"""The image objective: what the UNet is trained to predict, and how each step's loss is made.

`DenoisingLoss(k)` is the loss of micro-batch `k`: its images' latents (cached or encoded
now), their captions' conditioning, noise and timesteps drawn from the trainer's own generator
(so they depend on the seed and the step alone), the UNet's prediction and the target the
scheduler's `prediction_type` asks for, optionally weighted by min-SNR.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lorajobs.jobspecs.failures import UserDataError
from lorajobs.jobspecs.models import ImageJobSpec
from lorajobs.worker.trainers.distributed import Gang
from lorajobs.worker.trainers.image.data import ImageTrainSet
from lorajobs.worker.trainers.image.latents import CachePlan
from lorajobs.worker.trainers.image.models import Conditioning, Encoders, ImageBase
from lorajobs.worker.trainers.loop import to_device


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


def target(
    prediction_type: str,
    scheduler: Any,
    clean: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """What the UNet should predict for noised `clean` latents."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    if prediction_type == "sample":
        return clean
    raise UserDataError(f"base model scheduler: unsupported prediction_type {prediction_type!r}")


class DenoisingLoss:
    """The loss of micro-batch `k` (its images: a function of k and the seed)."""

    def __init__(
        self,
        spec: ImageJobSpec,
        ds: ImageTrainSet,
        base: ImageBase,
        cache: CachePlan,
        encoders: Encoders,
        latents: dict[tuple[int, bool], torch.Tensor] | None,
        embeddings: dict[str, Conditioning],
        noise_gen: torch.Generator,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.cfg, self.ds, self.base, self.cache = spec.training, ds, base, cache
        self.encoders, self.latents, self.embeddings = encoders, latents, embeddings
        self.noise_gen, self.device, self.dtype = noise_gen, device, dtype
        self.prediction_type = base.scheduler.config.prediction_type
        self.num_timesteps = base.scheduler.config.num_train_timesteps

    #: This process's place in a gang (several GPUs); rank 0 of 1 trains on whole batches.
    gang: Gang = Gang()

    def __call__(self, k: int) -> tuple[torch.Tensor, dict[str, int]]:
        on, counts = self.inputs(k)
        if self.gang.active:
            # Every rank draws the whole batch (the same noise as one worker), trains on its
            # rows; its mean loss averaged over the gang is the whole batch's.
            on = self.gang.rows(on)
            counts = {"images": int(on["timesteps"].shape[0])}
        return self.gang.global_loss(self._loss(on), counts)

    def inputs(self, k: int) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Micro-batch `k`'s tensors on the device (a pack concatenates several jobs')."""
        plan = self.ds.plan(k)
        clean, cond = self._inputs(k, plan)
        host = {"clean": clean, "context": cond.context, **self._noise(clean, len(plan.records))}
        if self.base.sdxl:
            assert cond.pooled is not None
            host["pooled"] = cond.pooled
            host["time_ids"] = torch.tensor(self.ds.size_conditioning(plan), dtype=self.dtype)
        # One queued copy per tensor: the host does not wait for the device's previous step.
        return to_device(host, self.device), {"images": len(plan.records)}

    def _inputs(self, k: int, plan: Any) -> tuple[torch.Tensor, Conditioning]:
        """The micro-batch's clean latents and its captions' conditioning."""
        if self.latents is not None:
            clean = torch.stack([self.latents[r, f] for r, f in zip(plan.records, plan.flipped)])
        else:
            clean = self.encoders.latents(self.ds.batch(k).pixels)
        if self.cache.text:
            cond = Conditioning.stack([self.embeddings[c] for c in plan.captions])
        elif self.cfg.train_text_encoder:
            cond = self.encoders.condition(list(plan.captions))  # with gradients into the LoRA
        else:
            cond = self.encoders.captions(list(plan.captions))
        return clean, cond

    def _noise(self, clean: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
        """Noise (with offset noise if asked) and timesteps, from the trainer's generator."""
        noise = torch.randn(clean.shape, generator=self.noise_gen)
        if self.cfg.noise_offset > 0:  # only then: the draw would shift every later one
            noise = noise + self.cfg.noise_offset * torch.randn(
                (clean.shape[0], clean.shape[1], 1, 1), generator=self.noise_gen
            )
        timesteps = torch.randint(0, self.num_timesteps, (n,), generator=self.noise_gen)
        return {"noise": noise, "timesteps": timesteps}

    def _loss(self, on: dict[str, torch.Tensor]) -> torch.Tensor:
        """Noise the latents, predict, and compare with the target (min-SNR weighted if asked)."""
        unet_in = self.unet_inputs(on)
        pred = self.base.unet(
            unet_in["sample"],
            unet_in["timestep"],
            encoder_hidden_states=unet_in["encoder_hidden_states"],
            added_cond_kwargs=unet_in.get("added_cond_kwargs"),
        ).sample
        return self.loss_of(on, pred)

    def unet_inputs(self, on: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The UNet's arguments for a micro-batch: noised latents, timesteps, conditioning."""
        dtype = self.dtype
        noisy = self.base.scheduler.add_noise(on["clean"], on["noise"], on["timesteps"])
        out: dict[str, Any] = {
            "sample": noisy.to(dtype),
            "timestep": on["timesteps"],
            "encoder_hidden_states": on["context"].to(dtype),
        }
        if self.base.sdxl:
            out["added_cond_kwargs"] = {
                "text_embeds": on["pooled"].to(dtype),
                "time_ids": on["time_ids"],
            }
        return out

    def loss_of(self, on: dict[str, torch.Tensor], pred: torch.Tensor) -> torch.Tensor:
        """The micro-batch's loss from the UNet's prediction `pred` of its rows."""
        scheduler = self.base.scheduler
        clean, noise, timesteps = on["clean"], on["noise"], on["timesteps"]
        want = target(self.prediction_type, scheduler, clean, noise, timesteps)
        if self.cfg.min_snr_gamma is None:
            return F.mse_loss(pred.float(), want.float())
        per_item = F.mse_loss(pred.float(), want.float(), reduction="none")
        per_item = per_item.mean(dim=list(range(1, per_item.ndim)))
        # On the device (add_noise moved alphas_cumprod there): no read-back. Indexing and
        # one IEEE division: the same values as on the CPU.
        snr = snr_at(scheduler.alphas_cumprod, timesteps)
        return (
            per_item * min_snr_weights(snr, self.cfg.min_snr_gamma, self.prediction_type)
        ).mean()
