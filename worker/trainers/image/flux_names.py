"""A Flux LoRA in kohya / ComfyUI naming: the original (BFL) block names, fused projections.

The original Flux model fuses projections that diffusers keeps apart: a double block's image
q/k/v are one `img_attn.qkv` Linear (likewise the text stream's), and a single block's
`linear1` is q|k|v|mlp-in. A LoRA trained on the split modules becomes one LoRA on the fused
module *exactly*: the down-projections stacked (rank n·r), the up-projections block-diagonal
(each member's output rows read only its own rank slice; members without LoRA get zero rows),
and the alpha written as scale × (n·r) so alpha / rank is unchanged. Names, per double block i
(`lora_unet_double_blocks_{i}_...`) and single block i (`lora_unet_single_blocks_{i}_...`), are
those diffusers' `_convert_kohya_flux_lora_to_diffusers` reads (lora_conversion_utils.py).
Text-encoder (CLIP) modules are `lora_te1_<path>` as in kohya's Flux files.
"""

from __future__ import annotations

import re

import torch

from lorajobs.worker.trainers.image.kohya import kohya_alpha

# diffusers path inside a double block → (kohya name, members of the fused module or None).
_DOUBLE = {
    "attn.to_q": ("img_attn_qkv", 0),
    "attn.to_k": ("img_attn_qkv", 1),
    "attn.to_v": ("img_attn_qkv", 2),
    "attn.add_q_proj": ("txt_attn_qkv", 0),
    "attn.add_k_proj": ("txt_attn_qkv", 1),
    "attn.add_v_proj": ("txt_attn_qkv", 2),
    "attn.to_out.0": ("img_attn_proj", None),
    "attn.to_add_out": ("txt_attn_proj", None),
    "ff.net.0.proj": ("img_mlp_0", None),
    "ff.net.2": ("img_mlp_2", None),
    "ff_context.net.0.proj": ("txt_mlp_0", None),
    "ff_context.net.2": ("txt_mlp_2", None),
    "norm1.linear": ("img_mod_lin", None),
    "norm1_context.linear": ("txt_mod_lin", None),
}
_SINGLE = {
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None),
    "norm.linear": ("modulation_lin", None),
}
_FUSED_SIZE = {"img_attn_qkv": 3, "txt_attn_qkv": 3, "linear1": 4}
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


def kohya_name(module: str) -> tuple[str, int | None]:
    """A transformer module path → (kohya module name, index in its fused module or None);
    `ValueError` for a module the kohya format has no name for."""
    m = _BLOCK.match(module)
    table = None if m is None else _DOUBLE if m.group(1) == "transformer_blocks" else _SINGLE
    if m is None or table is None or m.group(3) not in table:
        raise ValueError(f"{module}: no kohya name (only double/single block projections)")
    kind = "double_blocks" if m.group(1) == "transformer_blocks" else "single_blocks"
    name, index = table[m.group(3)]
    return f"lora_unet_{kind}_{m.group(2)}_{name}", index


def flux_to_kohya(
    state: dict[str, torch.Tensor],
    rank: int,
    alpha: float,
    use_rslora: bool,
    out_features: dict[str, int],
) -> dict[str, torch.Tensor]:
    """`transformer.<module>.lora_{A,B}.weight` → kohya tensors (fp32), fused where the original
    model fuses; `out_features`: each fused member's output width (module path → width), for
    the zero rows of members without LoRA. Text-encoder keys are left to the caller."""
    scale = kohya_alpha(rank, alpha, use_rslora) / rank  # what the LoRA multiplies by
    groups: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for key in sorted(state):
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
        down = state[key].detach().to("cpu", torch.float32)
        up = state[f"transformer.{module}.lora_B.weight"].detach().to("cpu", torch.float32)
        name, index = kohya_name(module)
        if index is None:
            out[f"{name}.lora_down.weight"] = down.contiguous()
            out[f"{name}.lora_up.weight"] = up.contiguous()
            out[f"{name}.alpha"] = torch.tensor(scale * down.shape[0])
        else:
            groups.setdefault(name, {})[index] = (down, up)
    for name, trained in groups.items():
        sibling = _siblings(name)
        prefix = "transformer." + name_prefix(name)
        widths = [
            trained[i][1].shape[0] if i in trained else out_features[prefix + sibling[i]]
            for i in range(_FUSED_SIZE[_kind(name)])
        ]
        downs = [trained[i][0] for i in sorted(trained)]
        fused_rank = sum(d.shape[0] for d in downs)
        up = torch.zeros(sum(widths), fused_rank)
        row, col = 0, 0
        for i, width in enumerate(widths):
            if i in trained:
                r = trained[i][0].shape[0]
                up[row : row + width, col : col + r] = trained[i][1]
                col += r
            row += width
        out[f"{name}.lora_down.weight"] = torch.cat(downs, dim=0).contiguous()
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = torch.tensor(scale * fused_rank)
    return out


def _kind(name: str) -> str:
    return next(k for k in _FUSED_SIZE if name.endswith(k))


def _siblings(name: str) -> dict[int, str]:
    """Fused member index → its diffusers path inside the block."""
    table = _SINGLE if "_single_blocks_" in name else _DOUBLE
    kind = _kind(name)
    return {i: path for path, (n, i) in table.items() if n == kind and i is not None}


def name_prefix(name: str) -> str:
    """`lora_unet_double_blocks_3_img_attn_qkv` → `transformer_blocks.3.` (single: likewise)."""
    m = re.match(r"lora_unet_(double|single)_blocks_(\d+)_", name)
    assert m is not None
    block = "transformer_blocks" if m.group(1) == "double" else "single_transformer_blocks"
    return f"{block}.{m.group(2)}."


def linear_widths(transformer: torch.nn.Module) -> dict[str, int]:
    """`transformer.<path>` → output width of every Linear (under LoRA: of its base layer)."""
    return {
        "transformer." + path.removesuffix(".base_layer"): module.out_features
        for path, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def exportable(state: dict[str, torch.Tensor]) -> str | None:
    """None when every transformer LoRA module has a kohya name, else the first that has not."""
    for key in sorted(state):
        if key.startswith("transformer.") and key.endswith(".lora_A.weight"):
            module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            try:
                kohya_name(module)
            except ValueError:
                return module
    return None
