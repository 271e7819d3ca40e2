"""The kohya-format export of an image LoRA (A1111, ComfyUI, Forge) and its header metadata.

kohya's sd-scripts trains SD 1.x/2.x LoRAs on the diffusers UNet, so its keys are the diffusers
module paths with '.' turned into '_': `lora_unet_<path>.lora_down.weight`, `.lora_up.weight`
and a scalar `.alpha` per module (scale = alpha / rank). Text-encoder modules are
`lora_te_<path>` (SD 1.x/2.x's one encoder) or `lora_te1_` / `lora_te2_` (SDXL's two), their
paths starting `text_model_` as in kohya's files. SDXL UNet modules get the original UNet names
that kohya's own SDXL files use (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`,
`sgm_names.sgm_path`), which every tool reads, not only those that also map diffusers names.
diffusers' `load_lora_weights` reads these files back and plays them exactly like the diffusers
file (tested, text encoders included).

Determinism: `pytorch_lora_weights.safetensors` carries only metadata that is a function of the
spec and the data, so its bytes repeat run after run. The kohya file also carries the real
training start/finish times (`ss_training_started_at`, `ss_training_finished_at`,
`modelspec.date`), as UIs show them: its tensors repeat, its bytes do not.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import torch

from lorajobs.worker.trainers.image.sgm_names import sgm_path

#: The SDXL base UNet's layout, for names when no config is given.
SDXL_UNET = {
    "layers_per_block": 2,
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
}

_DIFFUSERS_SUFFIXES = {
    ".lora.down.weight": ".lora_down.weight",  # UNet modules
    ".lora.up.weight": ".lora_up.weight",
    ".lora_linear_layer.down.weight": ".lora_down.weight",  # text-encoder modules
    ".lora_linear_layer.up.weight": ".lora_up.weight",
}


def kohya_alpha(rank: int, alpha: float, use_rslora: bool) -> float:
    """The kohya alpha giving the same scale: kohya always scales by alpha / rank, rsLoRA by
    alpha / sqrt(rank)."""
    return alpha * math.sqrt(rank) if use_rslora else alpha


def kohya_prefixes(sdxl: bool) -> dict[str, str]:
    """diffusers component → kohya key prefix."""
    if sdxl:
        return {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    return {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def diffusers_to_kohya(
    state: dict[str, torch.Tensor],
    alpha: float,
    use_rslora: bool = False,
    sdxl: bool = False,
    unet_config: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """`unet.<path>.lora.{down,up}.weight` and `text_encoder[_2].<path>.lora_linear_layer.*` →
    kohya `lora_unet_` / `lora_te[12]_<path_>` tensors, plus alphas. SDXL UNet paths become the
    original UNet's names, laid out by `unet_config` (default: SDXL's own)."""
    prefixes = kohya_prefixes(sdxl)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if "lora_magnitude_vector" in key:
            raise ValueError("DoRA adapters have no kohya export")
        component, _, rest = key.partition(".")
        if component not in prefixes:
            raise ValueError(f"{key}: no kohya name for component {component!r}")
        for src, dst in _DIFFUSERS_SUFFIXES.items():
            if rest.endswith(src):
                module = rest[: -len(src)]
                if sdxl and component == "unet":
                    module = sgm_path(module, unet_config or SDXL_UNET)
                name = prefixes[component] + module.replace(".", "_")
                out[name + dst] = value.detach().to("cpu", torch.float32).contiguous()
                if dst == ".lora_down.weight":
                    rank = value.shape[0]
                    out[name + ".alpha"] = torch.tensor(kohya_alpha(rank, alpha, use_rslora))
                break
        else:
            raise ValueError(f"{key}: not a diffusers LoRA weight")
    return out


def tensor_data_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' bytes in name order: the header-independent "model hash"."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def base_model_version(unet_config: dict[str, Any]) -> tuple[str, str]:
    """(kohya `ss_base_model_version`, modelspec architecture) for a UNet config, or a Flux
    transformer's (what kohya's Flux scripts write: flux1, flux-1-dev / flux-1-schnell)."""
    if "joint_attention_dim" in unet_config and "num_single_layers" in unet_config:
        dev = unet_config.get("guidance_embeds")
        return "flux1", f"flux-1-{'dev' if dev else 'schnell'}/lora"
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"
    cross = unet_config.get("cross_attention_dim")
    if cross == 1024:
        return "sd_v2", "stable-diffusion-v2/lora"
    return "sd_v1", "stable-diffusion-v1/lora"


def header_metadata(
    *,
    name: str,
    rank: int,
    alpha: float,
    use_rslora: bool,
    unet_config: dict[str, Any],
    steps: int,
    seed: int,
    learning_rate: float,
    resolution: int,
    captions: list[str],
    dataset: str,
    trigger: str | None,
    tensors_sha256: str,
    text_encoder_lr: float | None = None,
    started_at: float | None = None,
    finished_at: float | None = None,
) -> dict[str, str]:
    """kohya `ss_*` and `modelspec.*` keys. With times: the kohya file's; without: deterministic.

    `text_encoder_lr`: the text-encoder LoRA's learning rate where one was trained, else None.
    """
    ss_version, arch = base_model_version(unet_config)
    tags: Counter[str] = Counter()
    for caption in captions:
        tags.update(t.strip() for t in caption.split(",") if t.strip())
    folder = dataset.rstrip("/").rsplit("/", 1)[-1] or "dataset"
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": _num(kohya_alpha(rank, alpha, use_rslora)),
        "ss_base_model_version": ss_version,
        "ss_output_name": name,
        "ss_num_train_images": str(len(captions)),
        "ss_steps": str(steps),
        "ss_seed": str(seed),
        "ss_learning_rate": _num(learning_rate),
        "ss_unet_lr": _num(learning_rate),
        "ss_text_encoder_lr": _num(text_encoder_lr) if text_encoder_lr is not None else "0",
        "ss_network_train_unet_only": str(text_encoder_lr is None),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_tag_frequency": json.dumps({folder: dict(sorted(tags.items()))}, sort_keys=True),
        "ss_datasets": json.dumps(
            [
                {
                    "num_train_images": len(captions),
                    "resolution": [resolution, resolution],
                    "subsets": [{"image_dir": folder, "num_repeats": 1}],
                }
            ],
            sort_keys=True,
        ),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch,
        "modelspec.implementation": "https://github.com/huggingface/diffusers",
        "modelspec.title": name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.hash_sha256": "0x" + tensors_sha256,
    }
    if trigger:
        meta["modelspec.trigger_phrase"] = trigger
    if started_at is not None and finished_at is not None:
        meta["ss_training_started_at"] = _num(round(started_at, 3))
        meta["ss_training_finished_at"] = _num(round(finished_at, 3))
        meta["modelspec.date"] = datetime.fromtimestamp(finished_at, timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%S"
        )
    return meta


def _num(x: float) -> str:
    """8 → "8", 0.001 → "0.001": how kohya's tools print numbers."""
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)
