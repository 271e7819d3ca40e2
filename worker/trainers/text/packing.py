"""Token sequences → batches: padded per batch, or packed into fixed-length blocks.

Packing (`data.packing: true`) places whole examples into blocks of at most `max_seq_length`
tokens by best-fit decreasing (few blocks, little tail padding; no example is split). Inside a
block there is no leakage between examples:

- `position_ids` restart at 0 for every example, and a packed batch carries no
  `attention_mask`: transformers' masking (`find_packed_sequence_indices`, used by Llama,
  Mistral, Qwen, Gemma, … with SDPA, eager and flash attention) then builds a block-diagonal
  causal mask from the position resets, so each example attends only to itself — its logits
  equal those of the example alone (tested). Pass `use_cache=False` (a cache disables this).
- each example's first label is -100, so no token is predicted from the previous example;
  the loss terms are exactly those of the unpacked examples.

Batches of blocks are padded to the longest block in the batch; padding sits after the real
tokens (so causal attention never sees it), with labels -100 and its own position run.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import torch

IGNORE = -100  # label of a token without loss (the value transformers' losses skip)


@dataclass(frozen=True)
class TokenizedExample:
    """One example's tokens and labels (-100 where there is no loss)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    source: str = ""
    line: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class PackedBlock:
    """Several whole examples laid end to end."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    position_ids: tuple[int, ...]
    examples: tuple[int, ...]  # indices of the packed examples, in block order

    def __len__(self) -> int:
        return len(self.input_ids)


def pack(examples: list[TokenizedExample], max_len: int) -> list[PackedBlock]:
    """Best-fit decreasing: longest first, each into the fullest block it still fits."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    contents: list[list[int]] = []
    # (space left, block id), sorted: bisect finds the tightest block that fits.
    free: list[tuple[int, int]] = []
    for i in order:
        n = len(examples[i])
        if n > max_len:
            raise ValueError(f"example {i} has {n} tokens, more than the block size {max_len}")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, block = free.pop(k)
            contents[block].append(i)
            bisect.insort(free, (space - n, block))
        else:
            contents.append([i])
            bisect.insort(free, (max_len - n, len(contents) - 1))
    blocks = []
    for members in contents:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in members:
            ex = examples[i]
            ids.extend(ex.input_ids)
            labels.append(IGNORE)  # never predict an example's first token from the previous one
            labels.extend(ex.labels[1:])
            positions.extend(range(len(ex)))
        blocks.append(PackedBlock(tuple(ids), tuple(labels), tuple(positions), tuple(members)))
    return blocks


@dataclass(frozen=True)
class TextBatch:
    """Model inputs for one step; `model(**batch.model_inputs())`."""

    input_ids: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long, -100 where no loss
    attention_mask: torch.Tensor | None  # (B, T); None for packed batches (see module doc)
    position_ids: torch.Tensor | None  # (B, T); set for packed batches
    num_tokens: int  # real (non-padding) tokens
    num_label_tokens: int  # tokens that carry loss (after the causal shift)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        out = {"input_ids": self.input_ids, "labels": self.labels}
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids
        return out

    @property
    def capacity(self) -> int:
        return self.input_ids.numel()


class UnitTable:
    """Every unit (example or packed block) of a set, laid end to end in flat tensors, built
    once: a batch is then a dozen tensor ops whatever its size, where building it from the
    tuples costs a Python-to-tensor conversion per row and field every step (1.5x the time
    for padded batches of 4 on the tiny model, 3x for packed ones). Token counts per unit are
    kept too, so a batch's counts need no reductions. Stored as int32: about a tenth of what
    the tuples of Python ints take already."""

    def __init__(self, units: Sequence[TokenizedExample | PackedBlock], packed: bool) -> None:
        if not units:
            raise ValueError("no units to batch")
        self.packed = packed
        self.lengths = [len(u) for u in units]
        # transformers shifts labels left by one: a row's first label never carries loss.
        self.label_counts = [sum(1 for lab in u.labels[1:] if lab != IGNORE) for u in units]
        self.starts = list(itertools.accumulate(self.lengths, initial=0))[:-1]
        self.input_ids = _flat(u.input_ids for u in units)
        self.labels = _flat(u.labels for u in units)
        self.position_ids = (
            _flat(cast(PackedBlock, u).position_ids for u in units) if packed else None
        )

    def batch(self, idx: Sequence[int], pad_id: int) -> TextBatch:
        """Units `idx` as one batch, right-padded to the longest: padding has labels -100 and
        attention_mask 0 (padded mode), or its own position run from 0 (packed mode)."""
        lengths = [self.lengths[i] for i in idx]
        width = max(lengths)
        n = torch.tensor(lengths)[:, None]
        cols = torch.arange(width)
        real = cols < n  # (B, T): the units' own tokens
        # Each row reads its unit's span; padding columns read anything (clamped) and are masked.
        at = (torch.tensor([self.starts[i] for i in idx])[:, None] + cols).clamp_(
            max=self.input_ids.numel() - 1
        )
        input_ids = torch.where(real, self.input_ids[at], pad_id).long()
        labels = torch.where(real, self.labels[at], IGNORE).long()
        attention_mask = position_ids = None
        if self.position_ids is not None:
            position_ids = torch.where(real, self.position_ids[at], cols - n).long()
        else:
            attention_mask = real.long()
        return TextBatch(
            input_ids,
            labels,
            attention_mask,
            position_ids,
            sum(lengths),
            sum(self.label_counts[i] for i in idx),
        )


def _flat(seqs: Iterable[tuple[int, ...]]) -> torch.Tensor:
    return torch.tensor(list(itertools.chain.from_iterable(seqs)), dtype=torch.int32)


def collate_padded(examples: Sequence[TokenizedExample], pad_id: int) -> TextBatch:
    """Right-pad to the longest example; attention_mask 0 and labels -100 on padding."""
    return UnitTable(examples, packed=False).batch(range(len(examples)), pad_id)


def collate_packed(blocks: Sequence[PackedBlock], pad_id: int) -> TextBatch:
    """Stack blocks, padding to the longest; padding gets its own position run and no loss."""
    return UnitTable(blocks, packed=True).batch(range(len(blocks)), pad_id)
