"""diffusers UNet module paths -> the original (SGM / `ldm`) names of the SDXL UNet, which
kohya's sd-scripts write in its SDXL LoRA files and every tool reads: `input_blocks`,
`middle_block`, `output_blocks`, `time_embed`, `label_emb`, `out`, with resnets' original
inner names (`in_layers.2`, `emb_layers.1`, `out_layers.3`, `skip_connection`).

A1111 and ComfyUI also map diffusers-style names; smaller tools do not, and silently drop what
they cannot name. The block arithmetic is the inverse of diffusers' own
`_maybe_map_sgm_blocks_to_diffusers`: with L = `layers_per_block`, down block b's j-th layer is
input block 1 + b(L+1) + j (its downsampler the last of that group), up block b's j-th layer is
output block b(L+1) + j. Inside a transformer block the names are the same in both worlds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

_RESNET_INNER = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "conv_norm_out": "out.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_BLOCK = re.compile(
    r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$"
)
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


def sgm_path(path: str, unet_config: Mapping[str, Any]) -> str:
    """The original SDXL name of the diffusers UNet module `path` (dots kept)."""
    layers = int(unet_config.get("layers_per_block", 2))
    up_types: Sequence[str] = unet_config.get("up_block_types") or ()
    for src, dst in _TOP.items():
        if path == src or path.startswith(src + "."):
            return dst + path[len(src) :]
    if m := _MID.match(path):
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        index = 1 if kind == "attentions" else 2 * j  # resnet, attention, resnet
        return f"middle_block.{index}.{_inner(kind, rest)}"
    m = _BLOCK.match(path)
    if m is None:
        raise ValueError(f"{path}: no original SDXL name for this UNet module")
    where, b, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    if where == "down_blocks":
        if kind == "downsamplers":  # `conv` -> `op`, the last entry of the block's group
            return f"input_blocks.{(b + 1) * (layers + 1)}.0.op{rest[len('conv') :]}"
        return f"input_blocks.{1 + b * (layers + 1) + j}.{int(kind == 'attentions')}.{_inner(kind, rest)}"
    if kind == "upsamplers":  # after the resnet (and the attention, in a cross-attention block)
        slot = 2 if b < len(up_types) and "CrossAttn" in up_types[b] else 1
        return f"output_blocks.{b * (layers + 1) + layers}.{slot}.{rest}"
    return f"output_blocks.{b * (layers + 1) + j}.{int(kind == 'attentions')}.{_inner(kind, rest)}"


def _inner(kind: str, rest: str) -> str:
    if kind != "resnets":
        return rest
    head, _, tail = rest.partition(".")
    return _RESNET_INNER.get(head, head) + (f".{tail}" if tail else "")
