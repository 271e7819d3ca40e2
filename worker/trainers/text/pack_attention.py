"""Attention of a packed text batch, computed per member at the member's own length.

A pack pads its members' batches to one length. Linear layers, norms and RoPE work per token,
so extra rows and padding change none of their bits (measured on the CPU: the same rows of a
larger matmul come out identical). Attention is different: a longer key axis changes SDPA's
reduction lengths, and with them the last bits (~1e-6 over a few steps). So in a pack the
model's attention goes through `packed_attention`: SDPA once per member, on its own rows cropped
to its own length, with its own mask cropped likewise, or no mask where its batch had no padding
(as `create_causal_mask` gives the solo batch): each member's attention is the solo computation.
"""

from __future__ import annotations

from typing import Any

import torch

from lorajobs.worker.trainers.pack_lora import PackSlices

NAME = "lorajobs_pack_sdpa"


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, once per member of the pack (see the module doc)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    pack: PackSlices | None = getattr(module, "_lorajobs_pack", None)
    if pack is None or not pack.slices or pack.dense is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    width = query.shape[2]
    if all(d for d in pack.dense) and all(w is None or w == width for w in pack.widths):
        # No member is padded: the members' attention is one batched call of the same shapes
        # (batch rows are independent in SDPA; checked bitwise on the CPU by the pack tests).
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    outs = []
    rows = zip(pack.split(query), pack.split(key), pack.split(value))
    masks = pack.split(attention_mask) if attention_mask is not None else [None] * len(pack.dense)
    for (qs, ks, vs), m, own, dense in zip(rows, masks, pack.widths, pack.dense):
        w = own if own is not None else width
        q, k, v = qs[:, :, :w], ks[:, :, :w], vs[:, :, :w]
        mask = m[:, :, :w, :w] if m is not None and not dense else None
        out, _ = sdpa_attention_forward(module, q, k, v, mask, *args, **kwargs)
        if w < width:  # (B, w, H, d): padding positions attend to nothing that has a loss
            out = torch.nn.functional.pad(out, (0, 0, 0, 0, 0, width - w))
        outs.append(out)
    return torch.cat(outs, dim=0), None


def install_attention(model: torch.nn.Module, pack: PackSlices) -> None:
    """Give `model`'s attention layers the pack and switch it to `packed_attention`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, packed_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    for module in model.modules():
        if hasattr(module, "is_causal") and hasattr(module, "num_key_value_groups"):
            module._lorajobs_pack = pack
    model.set_attn_implementation(NAME)
