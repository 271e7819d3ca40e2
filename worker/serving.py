"""Whether a text adapter can be served as a LoRA by vLLM, and with which settings.

vLLM loads PEFT LoRA folders at run time (`--enable-lora`, `--lora-modules`) but not every
adapter: no DoRA magnitudes, no `modules_to_save` (fully trained embeddings or heads), no LoRA
bias, and a rank no larger than the server's `--max-lora-rank` (default 16), which takes one of
a fixed set of values. An adapter that does not qualify is served merged:
`lorajobs export <job> --merge -o merged/` gives a plain transformers folder. The sidecar and
the model card say which, so nobody finds out at deploy time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: The values vLLM accepts for `--max-lora-rank`, and its default.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_RANK = 16


def vllm_serving(adapter_config: dict[str, Any]) -> dict[str, Any]:
    """`{"servable", "reasons", "max_lora_rank"}` for a PEFT `adapter_config.json`."""
    reasons = []
    if adapter_config.get("use_dora"):
        reasons.append("DoRA (use_dora) adapters cannot be served as LoRAs by vLLM")
    if adapter_config.get("modules_to_save"):
        reasons.append(
            f"modules_to_save ({', '.join(adapter_config['modules_to_save'])}) are full modules, "
            "not LoRAs"
        )
    if adapter_config.get("bias", "none") != "none":
        reasons.append(f"bias={adapter_config['bias']!r}: vLLM serves LoRAs without bias")
    ranks = [
        int(adapter_config.get("r") or 0),
        *map(int, (adapter_config.get("rank_pattern") or {}).values()),
    ]
    rank = max(ranks)
    fits = [r for r in VLLM_RANKS if r >= rank]
    if not fits:
        reasons.append(f"rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]})")
    return {
        "servable": not reasons,
        "reasons": reasons,
        "rank": rank,
        "max_lora_rank": fits[0] if fits else None,
        "needs_max_lora_rank_flag": bool(fits) and fits[0] > VLLM_DEFAULT_RANK,
    }


def serving_of(adapter_dir: Path) -> dict[str, Any] | None:
    """The serving facts of a PEFT adapter folder; None when it has no adapter_config.json."""
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        return None
    return {"vllm": vllm_serving(json.loads(path.read_text(encoding="utf-8")))}


def card_lines(serving: dict[str, Any], name: str) -> list[str]:
    """The model card's "Serve it" section."""
    v = serving["vllm"]
    lines = ["## Serve it", ""]
    if not v["servable"]:
        return lines + [
            "Not as a LoRA in vLLM: " + "; ".join(v["reasons"]) + ".",
            "Serve it merged: `lorajobs export <job or this folder> --merge -o merged/`, then "
            "`vllm serve merged/`.",
        ]
    flag = f" --max-lora-rank {v['max_lora_rank']}" if v["needs_max_lora_rank_flag"] else ""
    return lines + [
        f"As a LoRA in vLLM (rank {v['rank']}):",
        "",
        "```bash",
        f"vllm serve <base model> --enable-lora{flag} --lora-modules {name}=path/to/this/folder",
        "```",
    ]
