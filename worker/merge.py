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

from lorajobs.jobspecs.failures import InvalidInput

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
DIFFUSERS_META_KEY = "lora_adapter_metadata"


@dataclass
class Adapter:
    """A LoRA read from disk: its kind, per-module (down, up) tensors, scale per module."""

    kind: str  # "text" (PEFT folder) or "image" (diffusers file)
    source: Path
    # Module path -> (down [r, in...], up [out, r...]). Image paths carry their component
    # (`unet.`, `text_encoder.`, `text_encoder_2.`); text paths are PEFT's, unprefixed.
    modules: dict[str, tuple[Any, Any]]
    scales: dict[str, float]
    # Per component ("" for a text adapter): the PEFT config, as packed in the file.
    configs: dict[str, dict[str, Any]]
    # Module path -> the (down, up) key suffixes it was stored with, kept on write.
    tags: dict[str, tuple[str, str]]


def adapter_kind(folder: Path) -> str:
    """ "text" for a PEFT folder, "image" for a diffusers LoRA folder."""
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


# The (down, up) key suffixes of LoRA weights: PEFT's, and the two diffusers writes (UNet
# layers; text-encoder layers in its older "lora_linear_layer" naming).
_TAGS = [
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
]
_TEXT_PREFIX = "base_model.model."


def load_adapter(folder: Path) -> Adapter:
    """Read an adapter folder of either kind."""
    from safetensors import safe_open

    kind = adapter_kind(folder)
    path = folder / (PEFT_WEIGHTS if kind == "text" else DIFFUSERS_WEIGHTS)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = f.metadata() or {}
    if kind == "text":
        configs = {"": json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8"))}
    else:
        if DIFFUSERS_META_KEY not in header:
            raise InvalidInput(f"{path}: no {DIFFUSERS_META_KEY} header (alpha unknown)")
        configs = {}
        for key, value in json.loads(header[DIFFUSERS_META_KEY]).items():
            component, _, field = key.partition(".")
            configs.setdefault(component, {})[field] = value
    if any(c.get("use_dora") for c in configs.values()):
        raise InvalidInput(f"{folder}: DoRA adapters cannot be merged exactly by concatenation")
    modules: dict[str, tuple[Any, Any]] = {}
    tags: dict[str, tuple[str, str]] = {}
    ups = {k for k in tensors if any(k.endswith(up) for _, up in _TAGS)}
    for key in sorted(tensors):
        if key in ups:
            continue
        tag = next(((d, u) for d, u in _TAGS if key.endswith(d)), None)
        if tag is None:
            raise InvalidInput(f"{path}: {key} is not a plain LoRA weight (bias, DoRA, embedding?)")
        module = key[: -len(tag[0])]
        if module + tag[1] not in tensors:
            raise InvalidInput(f"{path}: {key} has no matching {tag[1]}")
        name = module.removeprefix(_TEXT_PREFIX) if kind == "text" else module
        if kind == "image" and name.partition(".")[0] not in configs:
            raise InvalidInput(f"{path}: {key} belongs to no component of {DIFFUSERS_META_KEY}")
        modules[name] = (tensors[key].float(), tensors[module + tag[1]].float())
        tags[name] = tag
    if not modules:
        raise InvalidInput(f"{path}: no LoRA weights")
    scales = {}
    for m, (down, _) in modules.items():
        component, inner = _split(kind, m)
        scales[m] = _scale(inner, down.shape[0], configs[component])
    return Adapter(kind, folder, modules, scales, configs, tags)


def _split(kind: str, module: str) -> tuple[str, str]:
    """(component, path inside it) of a module path: ("", path) for text adapters."""
    if kind == "text":
        return "", module
    component, _, inner = module.partition(".")
    return component, inner


def merge_adapters(folders: list[Path], weights: list[float], out: Path) -> dict[str, Any]:
    """Write the rank-concatenation of `folders` at `weights` into `out`; return a summary."""
    if len(folders) < 2:
        raise InvalidInput("merge: give at least two adapters")
    if len(weights) != len(folders):
        raise InvalidInput(f"--weights: {len(weights)} weights for {len(folders)} adapters")
    adapters = [load_adapter(f) for f in folders]
    kinds = {a.kind for a in adapters}
    if len(kinds) != 1:
        raise InvalidInput("merge: adapters of different kinds (text and image) cannot be merged")
    kind = adapters[0].kind
    merged = _stack(adapters, weights)
    components = sorted({_split(kind, n)[0] for n in merged})
    configs = _merged_configs(kind, adapters, merged, components)
    files = _write_merged(kind, adapters, merged, configs, out)
    main = configs.get("unet") or configs[components[0]]  # what the summary line reports
    return {
        "kind": kind,
        "rank": main["r"],
        "rank_pattern": main["rank_pattern"],
        "modules": len(merged),
        "components": [c for c in components if c],
        "files": files,
    }


def _stack(adapters: list[Adapter], weights: list[float]) -> dict[str, tuple[Any, Any]]:
    """Per module: the downs stacked and the ups (weighted, scaled) side by side, so that
    up @ down is exactly the weighted sum of the adapters' deltas."""
    import torch

    names = sorted(set().union(*(a.modules for a in adapters)))
    merged: dict[str, tuple[Any, Any]] = {}
    for name in names:
        shapes = {tuple(a.modules[name][0].shape[1:]) for a in adapters if name in a.modules}
        outs = {
            tuple(a.modules[name][1].shape[:1]) + tuple(a.modules[name][1].shape[2:])
            for a in adapters
            if name in a.modules
        }
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

    return merged


def _merged_configs(
    kind: str, adapters: list[Adapter], merged: dict[str, tuple[Any, Any]], components: list[str]
) -> dict[str, dict[str, Any]]:
    # One config per component, each with the rank most of its modules have.
    configs: dict[str, dict[str, Any]] = {}
    for component in components:
        ranks = {
            inner: merged[n][0].shape[0]
            for n in merged
            for c, inner in [_split(kind, n)]
            if c == component
        }
        rank = max(set(ranks.values()), key=list(ranks.values()).count)
        # Pattern keys match module paths by suffix: `text_model.` is dropped so they match a
        # text encoder that transformers 5 loads without that level, and one that has it.
        pattern = {
            inner.removeprefix("text_model."): r for inner, r in sorted(ranks.items()) if r != rank
        }
        sources = [a.configs[component] for a in adapters if component in a.configs]
        configs[component] = {
            **sources[0],
            "r": rank,
            "lora_alpha": rank,  # scale 1: weights and scales are folded into the up matrices
            "rank_pattern": pattern,
            "alpha_pattern": dict(pattern),
            "use_rslora": False,
            "use_dora": False,
            "lora_dropout": 0.0,
            "target_modules": sorted(set().union(*(_targets(c) for c in sources))),
        }
    return configs


def _write_merged(
    kind: str,
    adapters: list[Adapter],
    merged: dict[str, tuple[Any, Any]],
    configs: dict[str, dict[str, Any]],
    out: Path,
) -> list[str]:
    """The merged adapter's files in `out`, in the format its kind loads from."""
    from lorajobs.worker.safetensors_io import save_canonical

    tag_of = {n: next(a.tags[n] for a in adapters if n in a.tags) for n in merged}

    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    prefix = _TEXT_PREFIX if kind == "text" else ""
    for n, (d, u) in merged.items():
        down_tag, up_tag = tag_of[n]
        tensors[f"{prefix}{n}{down_tag}"] = d.contiguous()
        tensors[f"{prefix}{n}{up_tag}"] = u.contiguous()
    if kind == "text":
        save_canonical(tensors, out / PEFT_WEIGHTS, {"format": "pt"})
        (out / PEFT_CONFIG).write_text(
            json.dumps(configs[""], indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        files = [PEFT_CONFIG, PEFT_WEIGHTS]
    else:
        packed = {f"{c}.{k}": v for c, cfg in configs.items() for k, v in cfg.items()}
        meta = {"format": "pt", DIFFUSERS_META_KEY: json.dumps(packed, indent=2, sort_keys=True)}
        save_canonical(tensors, out / DIFFUSERS_WEIGHTS, meta)
        files = [DIFFUSERS_WEIGHTS]
    return files


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
        base = AutoModelForCausalLM.from_pretrained(
            base_dir, local_files_only=True, dtype=torch.float32
        )
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
