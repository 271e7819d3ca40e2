"""Loading trained image adapters the way users do (diffusers pipelines) and looking at what
they change. Plain helpers, not fixtures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

PROMPT = "a photo of a red circle"


def pipeline(model: Path, lora_dir: Path | None = None, weight_name: str | None = None) -> Any:
    """The folder's pipeline (SD or SDXL, as model_index.json says), with the LoRA file loaded
    by diffusers' own `load_lora_weights` where one is given."""
    from diffusers import DiffusionPipeline

    torch.set_num_threads(1)
    pipe = DiffusionPipeline.from_pretrained(model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir, weight_name=weight_name)
    return pipe


def render(pipe: Any) -> np.ndarray:
    """One 64 px image of `PROMPT`, 2 denoising steps, fixed seed: a deterministic fingerprint
    of everything the pipeline runs (text encoders, UNet, VAE)."""
    return pipe(
        PROMPT,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]


def text_states(pipe: Any) -> list[torch.Tensor]:
    """Each text encoder's last hidden state for `PROMPT`."""
    out = []
    for suffix in ("", "_2"):
        te = getattr(pipe, f"text_encoder{suffix}", None)
        if te is None:
            continue
        tok = getattr(pipe, f"tokenizer{suffix}")
        ids = tok(
            PROMPT, padding="max_length", max_length=tok.model_max_length, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            out.append(te(ids, output_hidden_states=True).hidden_states[-1])
    return out


def keep_components(src: Path, dst: Path, prefixes: tuple[str, ...]) -> Path:
    """A copy of a diffusers LoRA file with only the tensors and packed configs of the
    components in `prefixes` (e.g. just `unet`)."""
    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k.split(".")[0] in prefixes}
        meta = dict(f.metadata())
    packed = json.loads(meta["lora_adapter_metadata"])
    meta["lora_adapter_metadata"] = json.dumps(
        {k: v for k, v in packed.items() if k.split(".")[0] in prefixes}
    )
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / src.name), metadata=meta)
    return dst


def v_prediction_copy(model: Path, dst: Path) -> Path:
    """A copy of the pipeline folder `model` whose scheduler predicts velocity (v-prediction,
    as SD 2.x does) instead of noise: same weights, other training target."""
    import shutil

    out = Path(shutil.copytree(model, dst))
    config_path = out / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    return out
