"""Several jobs' LoRAs on one frozen base, each applied to its own rows of one batch.

PEFT holds the adapters (one per job, each with its own rank, alpha, dropout and targets, made
by PEFT's own `add_adapter`, so names, initialisation and saved files are PEFT's). What PEFT
cannot do is train them together: its mixed-batch forward (`adapter_names=`) refuses training
mode, and diffusers models never pass it through. So `install` swaps the forward of every LoRA
`Linear` for `_packed_forward`: the base layer runs once on the whole concatenated batch, then
each job's LoRA update is added to its own slice of rows, with the same float operations PEFT's
`Linear.forward` uses for one adapter (`result + B(A(dropout(x))) * scaling`).

Dropout draws from the global torch generator in the solo trainer. Here each job keeps its own
generator state (`PackSlices.rng`), swapped in around its dropout call, so a job draws the same
masks in the same order as it would alone.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class PackSlices:
    """Which rows of the current batch belong to which adapter, and each adapter's RNG."""

    slices: list[tuple[str, slice]] = field(default_factory=list)
    # Per slice, the length (dim 1) of that adapter's own rows before they were padded to the
    # batch's; None: all of it. Its LoRA sees only that much, as it would alone: the same
    # dropout mask shape, the same matmul shapes; padding positions get the base output only.
    widths: list[int | None] = field(default_factory=list)
    # Per slice, whether that adapter's own batch had no padding (text: its attention then
    # takes no mask, as alone); None: the kind does not split attention.
    dense: list[bool] | None = None
    rng: dict[str, torch.Tensor] = field(default_factory=dict)  # CPU generator states
    cuda_rng: dict[str, torch.Tensor] = field(default_factory=dict)

    def set_rows(
        self, rows: list[tuple[str, int, int | None]], dense: list[bool] | None = None
    ) -> None:
        """Lay the adapters' batches (name, rows, own width) end to end, in the order given."""
        start, self.slices, self.widths, self.dense = 0, [], [], dense
        for name, size, width in rows:
            self.slices.append((name, slice(start, start + size)))
            self.widths.append(width)
            start += size

    def split(self, t: torch.Tensor) -> list[torch.Tensor]:
        """`t`'s rows, one chunk per slice. `split` (not indexing per slice): its backward
        concatenates the chunks' gradients once, where each indexed slice's backward would
        fill a whole batch-sized tensor of zeros (quadratic in the pack's size)."""
        if len(self.slices) == 1 and self.slices[0][1].stop is None:
            return [t]
        return list(t.split([r.stop - r.start for _, r in self.slices], dim=0))

    def alone(self, name: str) -> None:
        """Adapter `name` on every row of any batch (its eval pass, its samples)."""
        self.slices, self.widths, self.dense = [(name, slice(0, None))], [None], None

    @contextlib.contextmanager
    def own_rng(self, name: str, device: torch.device) -> Iterator[None]:
        """The global generator of `device` holds adapter `name`'s state inside the block."""
        if device.type == "cuda":
            saved = torch.cuda.get_rng_state(device)
            torch.cuda.set_rng_state(self.cuda_rng[name], device)
            try:
                yield
            finally:
                self.cuda_rng[name] = torch.cuda.get_rng_state(device)
                torch.cuda.set_rng_state(saved, device)
            return
        saved = torch.get_rng_state()
        torch.set_rng_state(self.rng[name])
        try:
            yield
        finally:
            self.rng[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def _packed_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """PEFT `lora.Linear.forward` for a packed batch: the base once, each LoRA on its rows."""
    pack: PackSlices = self._lorajobs_pack
    result = self.base_layer(x, *args, **kwargs)
    if not pack.slices:
        return result
    dtype = result.dtype
    parts = []
    chunks = zip(pack.slices, pack.widths, pack.split(result), pack.split(x))
    for (name, _), width, part, rows_x in chunks:
        if name in self.lora_A:
            cut = width is not None and width < x.shape[1]
            own = rows_x[:, :width] if cut else rows_x
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            xs = self._cast_input_dtype(own, lora_A.weight.dtype)
            dropout = self.lora_dropout[name]
            if self.training and isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                with pack.own_rng(name, xs.device):
                    xs = dropout(xs)
            if cut:
                updated = part[:, :width] + lora_B(lora_A(xs)) * self.scaling[name]
                part = torch.cat([updated, part[:, width:]], dim=1)
            else:
                part = part + lora_B(lora_A(xs)) * self.scaling[name]
        parts.append(part.to(dtype))
    return torch.cat(parts, dim=0)


def install(model: torch.nn.Module, pack: PackSlices) -> int:
    """Route every PEFT LoRA `Linear` in `model` through `_packed_forward`; how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module._lorajobs_pack = pack
            module.forward = types.MethodType(_packed_forward, module)  # type: ignore[method-assign]
            n += 1
    return n


def adapter_params(model: torch.nn.Module, name: str) -> list[tuple[str, torch.nn.Parameter]]:
    """Adapter `name`'s LoRA parameters, trainable, in module order, each named as the solo
    trainer names it (adapter "default"), so checkpoints are interchangeable with solo ones."""
    tag = f".{name}."
    out = []
    for pname, p in model.named_parameters():
        if tag in pname and ".lora_" in pname:
            p.requires_grad_(True)
            out.append((pname.replace(tag, ".default."), p))
    return out


class NamedParams(torch.nn.Module):
    """A module whose `named_parameters` are one job's LoRA weights (for `TrainLoop`)."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]]) -> None:
        super().__init__()
        self._named = named

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, Any]]:  # type: ignore[override]
        return iter(self._named)
