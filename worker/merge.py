"""Adapter composition and merged exports.

`merge_adapters`: several LoRAs at weights w_i become ONE LoRA whose update is exactly
sum_i w_i * scale_i * B_i A_i, by concatenating ranks: A = [A_1; A_2; ...] (down),
B = [w_1 scale_1 B_1, w_2 scale_2 B_2, ...] (up), alpha = rank so the new scale is 1. A module
only some adapters touch gets zero blocks from the others, so the result stays exact. Works on
PEFT folders (text) and diffusers `pytorch_lora_weights.safetensors` folders (image).

`merge_into_base`: a text adapter folded into its base model (`merge_and_unload`), saved as a
plain transformers model folder.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobspecs.errors import InvalidInput

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
DIFFUSERS_META_KEY = "lora_adapter_metadata"


@dataclass
class Adapter:
    """A LoRA read from disk: its kind, per-module (down, up) tensors, scale per module."""

    kind: str  # "text" (PEFT folder) or "image" (diffusers file)
    source: Path
    modules: dict[str, tuple[Any, Any]]  # module path -> (down [r, in...], up [out, r...])
    scales: dict[str, float]
    config: dict[str, Any]  # PEFT config (text) or the unprefixed diffusers LoRA config (image)


def adapter_kind(folder: Path) -> str:
    """"text" for a PEFT folder, "image" for a diffusers LoRA folder."""
    if (folder / PEFT_CONFIG).is_file() and (folder / PEFT_WEIGHTS).is_file():
        return "text"
    if (folder / DIFFUSERS_WEIGHTS).is_file():
        return "image"
    raise InvalidInput(
        f"{folder}: not an adapter folder (no {PEFT_CONFIG} + {PEFT_WEIGHTS}, "
        f"no {DIFFUSERS_WEIGHTS})"
    )


def _pattern_value(module: str, pattern: dict[str, Any], default: Any) -> Any:
    # PEFT's rule: a pattern key matches a module whose path ends with it.
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _scale(module: str, rank: int, config: dict[str, Any]) -> float:
    alpha = float(_pattern_value(module, config.get("alpha_pattern") or {}, config["lora_alpha"]))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def load_adapter(folder: Path) -> Adapter:
    """Read an adapter folder of either kind."""
    from safetensors import safe_open

    kind = adapter_kind(folder)
    if kind == "text":
        config = json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8"))
        path, prefix = folder / PEFT_WEIGHTS, "base_model.model."
        down_tag, up_tag = ".lora_A.weight", ".lora_B.weight"
    else:
        path, prefix = folder / DIFFUSERS_WEIGHTS, "unet."
        down_tag, up_tag = ".lora.down.weight", ".lora.up.weight"
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = f.metadata() or {}
    if kind == "image":
        if DIFFUSERS_META_KEY not in header:
            raise InvalidInput(f"{path}: no {DIFFUSERS_META_KEY} header (alpha unknown)")
        packed = json.loads(header[DIFFUSERS_META_KEY])
        config = {k.removeprefix("unet."): v for k, v in packed.items() if k.startswith("unet.")}
    if config.get("use_dora"):
        raise InvalidInput(f"{folder}: DoRA adapters cannot be merged exactly by concatenation")
    modules: dict[str, tuple[Any, Any]] = {}
    for key in sorted(tensors):
        if key.endswith(down_tag):
            module = key[: -len(down_tag)]
            up_key = module + up_tag
            if up_key not in tensors:
                raise InvalidInput(f"{path}: {key} has no matching {up_tag}")
            modules[module.removeprefix(prefix)] = (tensors[key].float(), tensors[up_key].float())
        elif not key.endswith(up_tag):
            raise InvalidInput(f"{path}: {key} is not a plain LoRA weight (bias, DoRA, embedding?)")
    if not modules:
        raise InvalidInput(f"{path}: no LoRA weights")
    scales = {m: _scale(m, down.shape[0], config) for m, (down, _) in modules.items()}
    return Adapter(kind, folder, modules, scales, config)


def merge_adapters(folders: list[Path], weights: list[float], out: Path) -> dict[str, Any]:
    """Write the rank-concatenation of `folders` at `weights` into `out`; return a summary."""
    import torch

    from worker.safetensors_io import save_canonical

    if len(folders) < 2:
        raise InvalidInput("merge: give at least two adapters")
    if len(weights) != len(folders):
        raise InvalidInput(f"--weights: {len(weights)} weights for {len(folders)} adapters")
    adapters = [load_adapter(f) for f in folders]
    kinds = {a.kind for a in adapters}
    if len(kinds) != 1:
        raise InvalidInput("merge: adapters of different kinds (text and image) cannot be merged")
    kind = adapters[0].kind
    names = sorted(set().union(*(a.modules for a in adapters)))
    merged: dict[str, tuple[Any, Any]] = {}
    for name in names:
        shapes = {tuple(a.modules[name][0].shape[1:]) for a in adapters if name in a.modules}
        outs = {tuple(a.modules[name][1].shape[:1]) + tuple(a.modules[name][1].shape[2:])
                for a in adapters if name in a.modules}
        if len(shapes) != 1 or len(outs) != 1:
            raise InvalidInput(f"merge: {name} has different shapes: not the same base model")
        downs, ups = [], []
        for a, w in zip(adapters, weights):
            if name in a.modules:
                down, up = a.modules[name]
                downs.append(down)
                ups.append(up * (w * a.scales[name]))
            else:  # this adapter leaves the module alone: a zero block keeps the sum exact
                ref_down, ref_up = next(x.modules[name] for x in adapters if name in x.modules)
                r = _rank_of(a)
                downs.append(torch.zeros((r, *ref_down.shape[1:]), dtype=torch.float32))
                ups.append(torch.zeros((ref_up.shape[0], r, *ref_up.shape[2:])))
        merged[name] = (torch.cat(downs, dim=0), torch.cat(ups, dim=1))
    ranks = {n: d.shape[0] for n, (d, _) in merged.items()}
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {n: r for n, r in sorted(ranks.items()) if r != rank}
    targets = sorted(set().union(*(_targets(a.config) for a in adapters)))

    out.mkdir(parents=True, exist_ok=True)
    base_cfg = dict(adapters[0].config)
    new_cfg = {
        **base_cfg,
        "r": rank,
        "lora_alpha": rank,  # scale 1: the weights and scales are folded into the up matrices
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "target_modules": targets,
    }
    if kind == "text":
        tensors = {}
        for n, (d, u) in merged.items():
            tensors[f"base_model.model.{n}.lora_A.weight"] = d.contiguous()
            tensors[f"base_model.model.{n}.lora_B.weight"] = u.contiguous()
        save_canonical(tensors, out / PEFT_WEIGHTS, {"format": "pt"})
        (out / PEFT_CONFIG).write_text(
            json.dumps(new_cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        files = [PEFT_CONFIG, PEFT_WEIGHTS]
    else:
        tensors = {}
        for n, (d, u) in merged.items():
            tensors[f"unet.{n}.lora.down.weight"] = d.contiguous()
            tensors[f"unet.{n}.lora.up.weight"] = u.contiguous()
        packed = {f"unet.{k}": v for k, v in new_cfg.items()}
        meta = {"format": "pt", DIFFUSERS_META_KEY: json.dumps(packed, indent=2, sort_keys=True)}
        save_canonical(tensors, out / DIFFUSERS_WEIGHTS, meta)
        files = [DIFFUSERS_WEIGHTS]
    return {"kind": kind, "rank": rank, "rank_pattern": pattern, "modules": len(merged),
            "files": files}


def _rank_of(adapter: Adapter) -> int:
    return max(d.shape[0] for d, _ in adapter.modules.values())


def _targets(config: dict[str, Any]) -> list[str]:
    t = config.get("target_modules") or []
    return [t] if isinstance(t, str) else list(t)


def merge_into_base(adapter_dir: Path, base_dir: Path, out: Path) -> None:
    """Fold a text (PEFT) adapter into its base model and save a plain transformers folder."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if adapter_kind(adapter_dir) != "text":
        raise InvalidInput(f"{adapter_dir}: --merge builds full models from text adapters only")
    try:
        base = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True,
                                                    dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise InvalidInput(f"base model {base_dir}: cannot load ({err})") from None
    model = PeftModel.from_pretrained(base, adapter_dir)
    merged = model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    try:
        AutoTokenizer.from_pretrained(base_dir, local_files_only=True).save_pretrained(out)
    except (OSError, ValueError):
        pass  # a base without a tokenizer folder: the weights are still a complete model
