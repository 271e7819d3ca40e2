"""The image trainer's base model: loading it, putting LoRA on it, and turning pixels and
captions into UNet inputs, for SD-1.x/2.x pipelines and SDXL alike.

SDXL is recognised by what the model *is*, not what it is called: a UNet with `text_time`
added conditioning, which needs a second text encoder (`text_encoder_2`, with a projection) for
its pooled text embeds. Its prompt embeds are both encoders' penultimate hidden states side by
side, as `StableDiffusionXLPipeline.encode_prompt` makes them; SD-1.x/2.x use the one encoder's
last hidden state, as `StableDiffusionPipeline` does.

LoRA weights leave here in diffusers' file layout: `unet.<module>.lora.{down,up}.weight` and
`text_encoder[_2].text_model.<module>.lora_linear_layer.{down,up}.weight`, with each
component's LoRA config packed under its prefix (`lora_adapter_metadata`), as
`save_lora_weights` writes them and `load_lora_weights` reads them back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorajobs.jobspecs.failures import UserDataError
from lorajobs.worker.safetensors_io import save_canonical
from lorajobs.worker.trainers.image.kohya import base_model_version

# The safetensors header key diffusers reads the LoRA config from (diffusers.loaders.lora_base
# LORA_ADAPTER_METADATA_KEY); without it, alpha is lost on load and the LoRA plays at scale 1.
ADAPTER_METADATA_KEY = "lora_adapter_metadata"
# What diffusers' train_text_to_image_lora(_sdxl) scripts put LoRA on in a CLIP text encoder.
TEXT_ENCODER_TARGETS = ["k_proj", "out_proj", "q_proj", "v_proj"]
_FAMILIES = {"sd_v1": "sd1", "sd_v2": "sd2", "sdxl_base_v1-0": "sdxl"}


@dataclass
class Conditioning:
    """What the UNet is conditioned on for a batch of captions."""

    context: torch.Tensor  # (B, tokens, D): encoder_hidden_states
    pooled: torch.Tensor | None = None  # (B, P): SDXL's text_embeds; None on SD-1.x/2.x

    def __getitem__(self, i: int) -> Conditioning:
        return Conditioning(self.context[i], None if self.pooled is None else self.pooled[i])

    @staticmethod
    def stack(items: list[Conditioning]) -> Conditioning:
        pooled = [c.pooled for c in items if c.pooled is not None]
        return Conditioning(
            torch.stack([c.context for c in items]), torch.stack(pooled) if pooled else None
        )


@dataclass
class ImageBase:
    """The frozen components of a diffusion pipeline folder."""

    family: str  # sd1 | sd2 | sdxl
    unet: Any
    vae: Any
    scheduler: Any  # a DDPMScheduler built from the pipeline's scheduler config
    text_encoders: dict[str, Any]  # pipeline name → model: text_encoder (, text_encoder_2)
    tokenizers: list[Any]  # one per text encoder, in the same order

    @property
    def sdxl(self) -> bool:
        return self.family == "sdxl"


def load_image_base(model_dir: Path) -> ImageBase:
    """Load a pipeline folder (SD-1.x/2.x or SDXL); `UserDataError` when it is neither."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    unet = _load(UNet2DConditionModel, model_dir, "unet")
    vae = _load(AutoencoderKL, model_dir, "vae")
    text_encoders = {"text_encoder": _load(CLIPTextModel, model_dir, "text_encoder")}
    tokenizers = [_load(CLIPTokenizer, model_dir, "tokenizer")]
    noise_scheduler = _load(DDPMScheduler, model_dir, "scheduler")
    added = unet.config.get("addition_embed_type")
    has_second = (model_dir / "text_encoder_2").is_dir()
    if added == "text_time":
        if not has_second:
            raise UserDataError(
                f"base model {model_dir}: the UNet takes SDXL conditioning (text_time) but there "
                "is no text_encoder_2 for its pooled text embeds"
            )
        second = _load(CLIPTextModelWithProjection, model_dir, "text_encoder_2")
        text_encoders["text_encoder_2"] = second
        tokenizers.append(_load(CLIPTokenizer, model_dir, "tokenizer_2"))
        _check_sdxl_widths(model_dir, unet, text_encoders)
    elif added is not None:
        raise UserDataError(
            f"base model {model_dir}: UNet addition_embed_type {added!r} is not supported "
            "(SD-1.x/2.x and SDXL pipelines are)"
        )
    elif has_second:
        raise UserDataError(
            f"base model {model_dir}: it has a text_encoder_2 but its UNet takes no pooled text "
            "embeds (addition_embed_type text_time): not an SDXL pipeline this trainer knows"
        )
    family = _FAMILIES[base_model_version(dict(unet.config))[0]]
    return ImageBase(family, unet, vae, noise_scheduler, text_encoders, tokenizers)


def _check_sdxl_widths(model_dir: Path, unet: Any, encoders: dict[str, Any]) -> None:
    """The encoders must fit the UNet: a mismatch would otherwise surface as a shape error."""
    hidden = sum(te.config.hidden_size for te in encoders.values())
    if unet.config.cross_attention_dim != hidden:
        raise UserDataError(
            f"base model {model_dir}: text encoders give {hidden}-wide prompt embeds, the UNet "
            f"attends over {unet.config.cross_attention_dim}"
        )
    pooled = encoders["text_encoder_2"].config.projection_dim
    expected = unet.add_embedding.linear_1.in_features
    if 6 * unet.config.addition_time_embed_dim + pooled != expected:
        raise UserDataError(
            f"base model {model_dir}: the UNet's added embedding takes {expected} inputs, not "
            f"6 size/crop ids x {unet.config.addition_time_embed_dim} + {pooled} pooled"
        )


def _load(cls: Any, model_dir: Path, subfolder: str) -> Any:
    try:
        return cls.from_pretrained(model_dir, subfolder=subfolder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserDataError(f"base model {model_dir}: cannot load {subfolder} ({err})") from None


def freeze(base: ImageBase, device: torch.device, dtype: torch.dtype) -> None:
    """Every base weight frozen, on `device` in `dtype` (the VAE in fp32 under fp16)."""
    for model in (base.unet, base.vae, *base.text_encoders.values()):
        model.requires_grad_(False)
        model.to(device, dtype=dtype)
    if dtype == torch.float16:
        base.vae.to(dtype=torch.float32)  # SD VAEs overflow in fp16; it runs once per image anyway
    base.vae.eval()
    for te in base.text_encoders.values():
        te.eval()


# -- inputs ------------------------------------------------------------------------------------


class Encoders:
    """The frozen VAE and the text encoders, turning pixels and captions into UNet inputs.

    Either may be dropped (set to None) once everything it would encode is cached.
    """

    def __init__(self, base: ImageBase, device: torch.device, dtype: torch.dtype) -> None:
        self.vae: Any = base.vae
        self.text_encoders: list[Any] | None = list(base.text_encoders.values())
        self.tokenizers = base.tokenizers
        self.sdxl = base.sdxl
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
    def captions(self, captions: list[str]) -> Conditioning:
        """Frozen text-encoder outputs of `captions`, on the CPU, fp32."""
        out = self.condition(captions)
        pooled = None if out.pooled is None else out.pooled.float().cpu()
        return Conditioning(out.context.float().cpu(), pooled)

    def condition(self, captions: list[str]) -> Conditioning:
        """Text-encoder outputs of `captions` on the device; differentiable where the encoders
        train (their LoRA), so this runs every step then."""
        assert self.text_encoders is not None, "text encoders were dropped after caching"
        if not self.sdxl:
            return Conditioning(self.text_encoders[0](self._ids(0, captions))[0])
        hidden, pooled = [], None
        for i, te in enumerate(self.text_encoders):
            out = te(self._ids(i, captions), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # SDXL reads the penultimate layer
            pooled = out[0]  # text_encoder_2's projected pool (text_embeds): the last one's
        return Conditioning(torch.cat(hidden, dim=-1), pooled)

    def _ids(self, i: int, captions: list[str]) -> torch.Tensor:
        tokenizer = self.tokenizers[i]
        return tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)


# -- LoRA ---------------------------------------------------------------------------------------


def add_text_encoder_lora(text_encoder: Any, config: Any) -> None:
    """Put the LoRA of `config` on a CLIP text encoder, as diffusers' scripts do.

    Through PEFT itself rather than transformers' `add_adapter`, whose version gate can refuse
    an installed PEFT that does the job (transformers 5.24 asks for PEFT >= 0.22).
    """
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, text_encoder, adapter_name="default")  # sets .peft_config


def checkpoint_text_encoder(text_encoder: Any) -> None:
    """Activation checkpointing on a text encoder that trains. Non-reentrant: with frozen
    embeddings the first layer's input has no grad, which the reentrant variant cannot take."""
    kwargs = {"use_reentrant": False}
    enable = getattr(text_encoder, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5.24; the older name warns there
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def lora_state(module: Any, prefix: str, adapter: str = "default") -> dict[str, torch.Tensor]:
    """One component's LoRA (PEFT adapter `adapter`) in diffusers' file layout under `prefix`
    (unet, text_encoder, text_encoder_2), fp32 on the CPU."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(module, adapter_name=adapter)
    state = convert_state_dict_to_diffusers(state)
    if prefix == "unet":
        # diffusers' rename table covers the attention projections only; other targets (convs,
        # proj_in/out, ff) would keep PEFT's lora_A/B names, and diffusers' loader takes the
        # naming of a file from its first key, silently dropping the keys named the other way.
        state = {_unet_lora_name(k): v for k, v in state.items()}
    # transformers 5 flattens CLIPTextModel (no `text_model.`): files keep the long-standing
    # `text_model.` paths, which every diffusers version (and the kohya converter) reads.
    inner = "text_model." if prefix != "unet" and not hasattr(module, "text_model") else ""
    return {f"{prefix}.{inner}{k}": v.detach().to("cpu", torch.float32) for k, v in state.items()}


def _unet_lora_name(key: str) -> str:
    """`<module>.lora_A.weight` → `<module>.lora.down.weight` (B: up); other keys as they are."""
    for peft, diffusers in (
        (".lora_A.weight", ".lora.down.weight"),
        (".lora_B.weight", ".lora.up.weight"),
    ):
        if key.endswith(peft):
            return key[: -len(peft)] + diffusers
    return key


def save_diffusers(
    tensors: dict[str, torch.Tensor],
    modules: dict[str, Any],
    path: Path,
    extra: dict[str, str],
    adapter: str = "default",
) -> None:
    """Write LoRA weights as diffusers' `save_lora_weights` would, but byte-deterministic:
    `modules` (prefix → PEFT-adapted model) give each component's LoRA config."""
    # Each config packed under its component's prefix, as diffusers' _pack_dict_with_prefix
    # does. Sets become sorted lists (diffusers makes them lists in set order, which differs
    # per process).
    packed: dict[str, Any] = {}
    for prefix, module in modules.items():
        # The config diffusers rebuilds the adapter from, for inference: no dropout. Its
        # loader leaves the UNet's new LoRA dropout layers in training mode, so a dropout here
        # would make every render random (the kohya file has none either).
        config = {**module.peft_config[adapter].to_dict(), "lora_dropout": 0.0}
        packed.update(
            {f"{prefix}.{k}": sorted(v) if isinstance(v, set) else v for k, v in config.items()}
        )
    metadata = {
        **extra,
        "format": "pt",
        ADAPTER_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True),
    }
    save_canonical(tensors, path, metadata)
