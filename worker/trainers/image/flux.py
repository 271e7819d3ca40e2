"""Flux.1 as a base model: recognising it, loading it, its prompt embeddings and its objective.

A base is Flux.1 when its `transformer/config.json` describes a Flux MMDiT (double and single
blocks, rotary axes, a joint attention width), never by its name; `guidance_embeds` says
whether it is guidance-distilled (FLUX.1-dev) or not (FLUX.1-schnell).

Conditioning, as `FluxPipeline.encode_prompt` makes it: T5's last hidden state (padded to the
T5 tokenizer's length, at most 512) is the context, CLIP's pooled output the pooled vector.
Latents are the VAE's 16-channel mean, shifted and scaled, packed 2x2 into tokens.

The objective is rectified flow (flow matching), as diffusers' `train_dreambooth_lora_flux`
and kohya's `flux_train_network`: x_t = (1 - sigma) x_0 + sigma noise, the transformer
predicts the velocity noise - x_0 at timestep sigma, and sigma is drawn per image by
`training.timestep_sampling` from the trainer's own generator.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lorajobs.jobspecs.failures import UserDataError
from lorajobs.jobspecs.models import ImageJobSpec
from lorajobs.worker.trainers.image.data import ImageTrainSet
from lorajobs.worker.trainers.image.latents import CachePlan
from lorajobs.worker.trainers.image.models import Conditioning, Encoders, _load
from lorajobs.worker.trainers.image.objective import DenoisingLoss
from lorajobs.worker.trainers.loop import to_device

# What a Flux transformer config has that no UNet config has.
_FLUX_KEYS = ("axes_dims_rope", "joint_attention_dim", "num_single_layers", "pooled_projection_dim")
# Default LoRA targets: the attention and feed-forward projections of the double blocks
# (image and text streams) and of the single blocks (q/k/v, the MLP's input, the fused
# attention+MLP output), as diffusers' Flux LoRA script and kohya's defaults cover them.
DOUBLE_TARGETS = [
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]
DEFAULT_GUIDANCE = 1.0
T5_MAX = 512  # FluxPipeline's ceiling on max_sequence_length


@contextlib.contextmanager
def cudnn_attention_off() -> Iterator[None]:
    """cuDNN's fused attention off for one Flux job, then as it was (also on an error): the
    switch is process-wide, and a Ray task worker trains other jobs after this one.

    cuDNN's fused attention failed in the backward pass of a Flux-sized joint attention (4096
    image + 512 text tokens, bf16; torch 2.11 on an H200: "mha_graph.execute"); flash /
    memory-efficient attention train it. The switch only matters on CUDA (it is a flag
    elsewhere), so it is set on every device: one path, testable on a CPU."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def transformer_config(model_dir: Path) -> dict[str, Any] | None:
    """The base's transformer config when it is a Flux transformer, else None."""
    path = Path(model_dir) / "transformer" / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if all(k in config for k in _FLUX_KEYS) else None


def is_flux(model_dir: Path) -> bool:
    """Whether `model_dir` is a Flux.1 pipeline folder (by its transformer's config)."""
    return transformer_config(model_dir) is not None


def default_targets(config: dict[str, Any]) -> list[str]:
    """The default LoRA targets of a Flux transformer with `config`: the double blocks'
    projections by suffix, the single blocks' `proj_mlp` and each single block's `proj_out` by
    full path (a bare `proj_out` would also catch the transformer's final projection)."""
    singles = [
        f"single_transformer_blocks.{i}.proj_out" for i in range(config["num_single_layers"])
    ]
    return sorted([*DOUBLE_TARGETS, "proj_mlp", *singles])


@dataclass
class FluxBase:
    """The frozen components of a Flux.1 pipeline folder. Attribute names follow `ImageBase`
    (vae, text_encoders, tokenizers, sdxl) so the shared caching code reads both."""

    family: str  # flux-dev (guidance-distilled) | flux-schnell
    transformer: Any
    vae: Any
    scheduler: Any  # FlowMatchEulerDiscreteScheduler: its shift settings drive sampling
    text_encoders: dict[str, Any]  # text_encoder (CLIP), text_encoder_2 (T5)
    tokenizers: list[Any]
    sdxl: bool = False

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)


def load_flux_models(model_dir: Path) -> FluxBase:
    """Every component of a Flux.1 pipeline folder, the one place they are loaded (a
    quantization option wraps this). `UserDataError` when the parts do not fit together."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

    transformer = _load(FluxTransformer2DModel, model_dir, "transformer")
    vae = _load(AutoencoderKL, model_dir, "vae")
    clip = _load(CLIPTextModel, model_dir, "text_encoder")
    t5 = _load(T5EncoderModel, model_dir, "text_encoder_2")
    tokenizers = [
        _load(CLIPTokenizer, model_dir, "tokenizer"),
        _load(AutoTokenizer, model_dir, "tokenizer_2"),
    ]
    scheduler = _load(FlowMatchEulerDiscreteScheduler, model_dir, "scheduler")
    cfg = transformer.config
    checks = [
        (t5.config.d_model, cfg.joint_attention_dim, "T5's d_model", "joint_attention_dim"),
        (
            clip.config.hidden_size,
            cfg.pooled_projection_dim,
            "CLIP's width",
            "pooled_projection_dim",
        ),
        (4 * vae.config.latent_channels, cfg.in_channels, "4 x VAE latent channels", "in_channels"),
        (sum(cfg.axes_dims_rope), cfg.attention_head_dim, "sum(axes_dims_rope)", "head dim"),
    ]
    for got, want, what, field in checks:
        if got != want:
            raise UserDataError(
                f"base model {model_dir}: {what} is {got} but the transformer's {field} is {want}"
            )
    family = "flux-dev" if cfg.guidance_embeds else "flux-schnell"
    encoders = {"text_encoder": clip, "text_encoder_2": t5}
    return FluxBase(family, transformer, vae, scheduler, encoders, tokenizers)


def freeze_flux(base: FluxBase, device: torch.device, dtype: torch.dtype) -> None:
    """Every base weight frozen, on `device` in `dtype`, encoders in eval mode."""
    for model in (base.transformer, base.vae, *base.text_encoders.values()):
        model.requires_grad_(False)
        model.to(device, dtype=dtype)
    if dtype == torch.float16:
        # T5 overflows in fp16 (its feed-forward activations exceed 65504): bf16 where the
        # device has it, else fp32. It runs once per caption and is released after caching.
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        base.text_encoders["text_encoder_2"].to(dtype=torch.bfloat16 if bf16 else torch.float32)
    base.vae.eval()
    for te in base.text_encoders.values():
        te.eval()


def t5_length(tokenizer: Any) -> int:
    """T5 tokens per prompt: the tokenizer's own length, at most the pipeline's 512 (the
    samples pass the same `max_sequence_length`, so training and rendering agree)."""
    return int(min(T5_MAX, tokenizer.model_max_length))


class FluxEncoders(Encoders):
    """The VAE (latents shifted and scaled, as `Encoders.latents`) and Flux's two text
    encoders: T5's last hidden state as context, CLIP's pooled output as the pooled vector."""

    def condition(self, captions: list[str]) -> Conditioning:
        assert self.text_encoders is not None, "text encoders were dropped after caching"
        clip, t5 = self.text_encoders
        pooled = clip(self._flux_ids(0, captions), output_hidden_states=False).pooler_output
        context = t5(self._flux_ids(1, captions), output_hidden_states=False)[0]
        return Conditioning(context, pooled)

    def _flux_ids(self, i: int, captions: list[str]) -> torch.Tensor:
        tokenizer = self.tokenizers[i]
        length = tokenizer.model_max_length if i == 0 else t5_length(tokenizer)
        return tokenizer(
            captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)


def check_flux_spec(spec: ImageJobSpec, base: FluxBase) -> float | None:
    """Refuse settings that mean nothing for a flow-matching base; return the guidance value
    (None on a base without a guidance embedding)."""
    cfg = spec.training
    if cfg.min_snr_gamma is not None:
        raise UserDataError(
            "training.min_snr_gamma: min-SNR weighting is for DDPM bases; a flow-matching base "
            "(Flux.1) draws sigma by training.timestep_sampling instead"
        )
    if cfg.noise_offset > 0:
        raise UserDataError("training.noise_offset: not used with flow-matching bases (Flux.1)")
    check_packing(spec, 2 ** (len(base.vae.config.block_out_channels) - 1))
    if not base.guidance_embeds:
        if cfg.guidance_scale is not None:
            raise UserDataError(
                "training.guidance_scale: this base's transformer has no guidance embedding "
                "(guidance_embeds false, as FLUX.1-schnell); remove it"
            )
        return None
    return DEFAULT_GUIDANCE if cfg.guidance_scale is None else cfg.guidance_scale


def check_packing(spec: ImageJobSpec, vae_scale: int) -> None:
    """Flux packs latents 2x2 into tokens: image sides must be multiples of 2 x the VAE's
    downsampling (16 px on FLUX.1), for the square resolution and for every bucket."""
    unit = 2 * vae_scale
    if spec.training.resolution % unit:
        raise UserDataError(
            f"training.resolution: {spec.training.resolution} is not a multiple of {unit} "
            f"(this Flux base packs 2x2 latents of a {vae_scale}x VAE)"
        )
    if spec.data.bucketing and spec.data.bucket_step % unit:
        raise UserDataError(
            f"data.bucket_step: {spec.data.bucket_step} is not a multiple of {unit} "
            f"(this Flux base packs 2x2 latents of a {vae_scale}x VAE)"
        )


def refuse_flow_settings(spec: ImageJobSpec) -> None:
    """Flow-matching settings given for a DDPM (SD / SDXL) base: one clear line."""
    cfg, fields = spec.training, type(spec.training).model_fields
    # Set and not the default: a spec that went through the queue has every field set (it is
    # stored dumped), so being set alone does not mean the user asked for it.
    given = {
        name
        for name in ("timestep_sampling", "logit_mean", "logit_std", "guidance_scale")
        if name in cfg.model_fields_set and getattr(cfg, name) != fields[name].get_default()
    }
    if given:
        raise UserDataError(
            f"training.{sorted(given)[0]}: only for flow-matching bases (Flux.1); this base is a "
            "DDPM UNet (SD / SDXL)"
        )


# -- the objective ------------------------------------------------------------------------------


def sample_sigmas(
    spec: ImageJobSpec, scheduler_config: Any, n: int, tokens: int, gen: torch.Generator
) -> torch.Tensor:
    """`n` noise levels in (0, 1) by `training.timestep_sampling`, drawn from `gen` (CPU)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    cfg = spec.training
    scheme = "none" if cfg.timestep_sampling == "uniform" else "logit_normal"
    u = compute_density_for_timestep_sampling(
        scheme, n, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std, generator=gen
    )
    if cfg.timestep_sampling != "shift":
        return u
    get = scheduler_config.get
    if get("use_dynamic_shifting"):
        # FluxPipeline's calculate_shift: mu grows linearly with the image's token count.
        lo, hi = get("base_image_seq_len", 256), get("max_image_seq_len", 4096)
        b0, b1 = get("base_shift", 0.5), get("max_shift", 1.15)
        mu = b0 + (b1 - b0) * (tokens - lo) / (hi - lo)
        return math.exp(mu) / (math.exp(mu) + (1 / u - 1))  # the scheduler's exponential shift
    shift = get("shift", 1.0)
    return shift * u / (1 + (shift - 1) * u)


class FlowMatchLoss(DenoisingLoss):
    """The loss of micro-batch `k` on a Flux transformer: inputs as `DenoisingLoss` (cached or
    fresh latents and conditioning), noise and sigma from the trainer's generator."""

    def __init__(
        self,
        spec: ImageJobSpec,
        ds: ImageTrainSet,
        base: FluxBase,
        cache: CachePlan,
        encoders: Encoders,
        latents: dict[tuple[int, bool], torch.Tensor] | None,
        embeddings: dict[str, Conditioning],
        noise_gen: torch.Generator,
        device: torch.device,
        dtype: torch.dtype,
        guidance: float | None,
    ) -> None:
        self.spec, self.cfg, self.ds, self.base, self.cache = spec, spec.training, ds, base, cache
        self.encoders, self.latents, self.embeddings = encoders, latents, embeddings
        self.noise_gen, self.device, self.dtype = noise_gen, device, dtype
        self.guidance = guidance

    def __call__(self, k: int) -> tuple[torch.Tensor, dict[str, int]]:
        plan = self.ds.plan(k)
        clean, cond = self._inputs(k, plan)
        n, _, h, w = clean.shape
        assert cond.pooled is not None
        noise = torch.randn(clean.shape, generator=self.noise_gen)
        sigmas = sample_sigmas(self.spec, self.base.scheduler.config, n, h * w // 4, self.noise_gen)
        host = {"clean": clean, "noise": noise, "sigmas": sigmas}
        host.update(context=cond.context, pooled=cond.pooled)
        return self._loss(to_device(host, self.device)), {"images": n}

    def _loss(self, on: dict[str, torch.Tensor]) -> torch.Tensor:
        return flow_loss(self.base.transformer, on, self.dtype, self.guidance)


def flow_loss(
    transformer: Any, on: dict[str, torch.Tensor], dtype: torch.dtype, guidance: float | None
) -> torch.Tensor:
    """MSE between the transformer's velocity and noise - x_0, in packed-token space (a
    permutation of the latent, so the same mean as unpacked). `on`: clean, noise, sigmas,
    context, pooled, on the device."""
    from diffusers import FluxPipeline

    clean, noise, sigmas = on["clean"], on["noise"], on["sigmas"]
    b, c, h, w = clean.shape
    s = sigmas.view(-1, 1, 1, 1)
    noisy = (1.0 - s) * clean + s * noise
    packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, clean.device, dtype)
    context = on["context"].to(dtype)
    txt_ids = torch.zeros(context.shape[1], 3, device=clean.device, dtype=dtype)
    g = None
    if guidance is not None:
        g = torch.full((b,), guidance, device=clean.device, dtype=torch.float32)
    pred = transformer(
        hidden_states=packed.to(dtype),
        encoder_hidden_states=context,
        pooled_projections=on["pooled"].to(dtype),
        timestep=sigmas.to(dtype),  # the transformer scales by 1000 itself, as the pipeline's /1000
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=g,
        return_dict=False,
    )[0]
    want = FluxPipeline._pack_latents(noise - clean, b, c, h, w)
    return F.mse_loss(pred.float(), want.float())
