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
from dataclasses import dataclass

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


def collate_padded(examples: list[TokenizedExample], pad_id: int) -> TextBatch:
    """Right-pad to the longest example; attention_mask 0 and labels -100 on padding."""
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        input_ids[i, : len(e)] = torch.tensor(e.input_ids, dtype=torch.long)
        attention_mask[i, : len(e)] = 1
        labels[i, : len(e)] = torch.tensor(e.labels, dtype=torch.long)
    return TextBatch(
        input_ids, labels, attention_mask, None, int(attention_mask.sum()), _label_count(labels)
    )


def collate_packed(blocks: list[PackedBlock], pad_id: int) -> TextBatch:
    """Stack blocks, padding to the longest; padding gets its own position run and no loss."""
    width = max(len(b) for b in blocks)
    input_ids = torch.full((len(blocks), width), pad_id, dtype=torch.long)
    labels = torch.full((len(blocks), width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(blocks), width), dtype=torch.long)
    for i, b in enumerate(blocks):
        n = len(b)
        input_ids[i, :n] = torch.tensor(b.input_ids, dtype=torch.long)
        labels[i, :n] = torch.tensor(b.labels, dtype=torch.long)
        position_ids[i, :n] = torch.tensor(b.position_ids, dtype=torch.long)
        position_ids[i, n:] = torch.arange(width - n)
    tokens = sum(len(b) for b in blocks)
    return TextBatch(input_ids, labels, None, position_ids, tokens, _label_count(labels))


def _label_count(labels: torch.Tensor) -> int:
    # transformers shifts labels left by one: the first column never carries loss.
    return int((labels[:, 1:] != IGNORE).sum())
