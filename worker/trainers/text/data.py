"""The text training set: JSONL rows → formats → tokens with loss masks → step batches.

Integration contract (what the text trainer calls):

    ds = build_text_dataset(data_path, spec, tokenizer, validation_path=None)
    len(ds)                    # batch units per epoch: examples, or packed blocks
    ds.examples                # train TokenizedExample list (input_ids, labels; -100 = no loss)
    ds.validation              # held-out TokenizedExamples ([] without a validation set)
    batch = ds.batch(step)     # 0-based step → TextBatch; model(**batch.model_inputs(),
                               #   use_cache=False); order is a pure function of (seed, step)
    for b in ds.eval_batches(): ...   # the validation set, in order, same packing mode
    ds.stats()                 # examples, tokens, label tokens, blocks, useful_fraction, ...

`validation_path` is the local copy of `data.validation` (the caller pulls the URI);
`data.validation_split` is applied here, seeded by `training.seed`. Every data problem is a
`UserDataError` naming the file and line.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorajobs.jobspecs.failures import UserDataError
from lorajobs.jobspecs.models import TextData, TextJobSpec
from lorajobs.worker.jsonl import JsonRow, read_rows
from lorajobs.worker.trainers.text.chat import render_with_spans, resolve_chat_template
from lorajobs.worker.trainers.text.formats import Record, to_records
from lorajobs.worker.trainers.text.packing import (
    IGNORE,
    PackedBlock,
    TextBatch,
    TokenizedExample,
    UnitTable,
    collate_packed,
    collate_padded,
    pack,
)
from lorajobs.worker.trainers.text.plain import jsonl_files


def load_rows(path: Path) -> list[JsonRow]:
    """Every row under a dataset path (a file, or a folder's `*.jsonl`, sorted)."""
    rows = [row for f in jsonl_files(path) for row in read_rows(f)]
    if not rows:
        raise UserDataError(f"dataset {path}: no examples")
    return rows


def split_validation(rows: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, validation), both in dataset order; the held-out rows are a seeded choice."""
    if fraction <= 0:
        return list(rows), []
    n_val = max(1, round(len(rows) * fraction))
    if n_val >= len(rows):
        raise UserDataError(
            f"data.validation_split {fraction}: {len(rows)} examples leave none to train on"
        )
    order = list(range(len(rows)))
    random.Random(f"lorajobs-validation:{seed}").shuffle(order)
    held = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def encode_record(
    record: Record,
    tokenizer: Any,
    max_len: int,
    *,
    chat_template: str | None = None,
    train_on_prompt: bool = False,
) -> TokenizedExample:
    """Tokens and labels of one record; labels are -100 outside the trained characters."""
    if record.format == "chat":
        if chat_template is None:
            raise ValueError("chat records need a chat template")
        text, spans = render_with_spans(tokenizer, chat_template, record.messages, record.where)
        add_special, add_eos = False, False  # the template owns BOS and end-of-turn markers
    else:
        text, spans, pos = "", [], 0
        for seg in record.segments:
            if seg.train:
                spans.append((pos, pos + len(seg.text)))
            text += seg.text
            pos += len(seg.text)
        add_special, add_eos = True, bool(record.segments[-1].train)
    if train_on_prompt:
        spans = [(0, len(text))]
    if not getattr(tokenizer, "is_fast", False):
        ids, labels = _encode_by_prefixes(tokenizer, text, spans, max_len, add_special)
    else:
        enc = tokenizer(
            text,
            add_special_tokens=add_special,
            truncation=True,
            max_length=max_len,
            return_offsets_mapping=True,
        )
        ids = list(enc["input_ids"])
        labels = []
        for tok, (start, end) in zip(ids, enc["offset_mapping"]):
            # A token is trained if any of its characters is; a zero-width token (a special
            # added by the tokenizer) only if it sits inside a trained span.
            if end > start:
                trained = any(start < b and end > a for a, b in spans)
            else:
                trained = any(a <= start < b for a, b in spans)
            labels.append(tok if trained else IGNORE)
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None and len(ids) < max_len and (not ids or ids[-1] != eos):
        ids.append(eos)
        labels.append(eos)
    return TokenizedExample(tuple(ids), tuple(labels), record.source, record.line)


def _encode_by_prefixes(
    tokenizer: Any, text: str, spans: list[tuple[int, int]], max_len: int, add_special: bool
) -> tuple[list[int], list[int]]:
    """Slow tokenizers have no offsets: a span's tokens are those between the token counts of
    the text up to its start and up to its end (exact when prefixes tokenize as prefixes)."""

    def count(upto: int) -> int:
        return len(tokenizer(text[:upto], add_special_tokens=add_special)["input_ids"])

    ids = list(
        tokenizer(text, add_special_tokens=add_special, truncation=True, max_length=max_len)[
            "input_ids"
        ]
    )
    trained = [False] * len(ids)
    for a, b in spans:
        for k in range(count(a), min(count(b), len(ids))):
            trained[k] = True
    return ids, [t if on else IGNORE for t, on in zip(ids, trained)]


def tokenize_records(
    records: list[Record], tokenizer: Any, data: TextData, max_len: int
) -> list[TokenizedExample]:
    """Encode every record; chat records use the resolved template."""
    template = None
    if any(r.format == "chat" for r in records):
        template = resolve_chat_template(tokenizer, data.chat_template)
    return [
        encode_record(
            r, tokenizer, max_len, chat_template=template, train_on_prompt=data.train_on_prompt
        )
        for r in records
    ]


def _trainable(ex: TokenizedExample) -> bool:
    # A loss needs a labelled token after the first (labels are shifted by one).
    return len(ex) > 1 and any(lab != IGNORE for lab in ex.labels[1:])


class TextTrainSet:
    """Tokenised (and optionally packed) examples with a step-addressable batch order."""

    def __init__(
        self,
        examples: list[TokenizedExample],
        validation: list[TokenizedExample],
        *,
        batch_size: int,
        seed: int,
        max_len: int,
        packing: bool,
        pad_id: int,
        dropped: int = 0,
    ) -> None:
        self.examples, self.validation = examples, validation
        self.batch_size, self.seed, self.max_len = batch_size, seed, max_len
        self.packing, self.pad_id, self.dropped = packing, pad_id, dropped
        self.blocks: list[PackedBlock] = pack(examples, max_len) if packing else []
        # Built once: each step's batch is gathered from it (see UnitTable).
        self._table = UnitTable(self.blocks if packing else examples, packed=packing)
        self._orders: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.blocks) if self.packing else len(self.examples)

    def indices(self, step: int) -> list[int]:
        """Unit indices of 0-based `step`: consecutive slices of one permutation per epoch
        (a batch may span two epochs); a pure function of (seed, step)."""
        n, out = len(self), []
        for k in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, pos = divmod(k, n)
            if epoch not in self._orders:
                order = list(range(n))
                # The same stream the text trainer used before packing existed.
                random.Random(f"lorajobs-text:{self.seed}:{epoch}").shuffle(order)
                self._orders = {epoch: order}
            out.append(self._orders[epoch][pos])
        return out

    def batch(self, step: int, rank: int = 0, world: int = 1) -> TextBatch:
        """The batch of 0-based `step`; in a gang of `world` workers, rank `rank`'s share of it
        (every `world`-th row, from `rank`)."""
        return self._table.batch(self.indices(step)[rank::world], self.pad_id)

    def label_tokens(self, step: int) -> int:
        """Tokens that carry loss in the whole batch of `step` (what its mean loss divides by)."""
        return sum(self._table.label_counts[i] for i in self.indices(step))

    def eval_batches(self, batch_size: int | None = None) -> Iterator[TextBatch]:
        """The validation set in order, packed like training; nothing when there is none."""
        bs = batch_size or self.batch_size
        if self.packing:
            blocks = pack(self.validation, self.max_len)
            for i in range(0, len(blocks), bs):
                yield collate_packed(blocks[i : i + bs], self.pad_id)
        else:
            for i in range(0, len(self.validation), bs):
                yield collate_padded(self.validation[i : i + bs], self.pad_id)

    def stats(self, epoch_steps: int | None = None) -> dict[str, float | int]:
        """Sizes, and the useful (non-padding) token fraction over one epoch of batches."""
        steps = epoch_steps or max(1, -(-len(self) // self.batch_size))
        tokens = capacity = 0
        for step in range(steps):
            b = self.batch(step)
            tokens += b.num_tokens
            capacity += b.capacity
        return {
            "examples": len(self.examples),
            "validation_examples": len(self.validation),
            "dropped_examples": self.dropped,
            "tokens": sum(len(e) for e in self.examples),
            "label_tokens": sum(
                sum(1 for lab in e.labels[1:] if lab != IGNORE) for e in self.examples
            ),
            "blocks": len(self.blocks),
            "useful_fraction": round(tokens / max(capacity, 1), 4),
        }


def build_text_dataset(
    data_path: Path,
    spec: TextJobSpec,
    tokenizer: Any,
    validation_path: Path | None = None,
) -> TextTrainSet:
    """Read, check, split, tokenise and (optionally) pack a text job's data."""
    data, tr = spec.data, spec.training
    rows = load_rows(Path(data_path))
    records = to_records(rows, data.format)
    fmt = records[0].format
    if validation_path is not None:
        val_rows = load_rows(Path(validation_path))
        # The validation set is held to the training set's format.
        val_records = to_records(val_rows, fmt)
    else:
        records, val_records = split_validation(records, data.validation_split, tr.seed)
    train = tokenize_records(records, tokenizer, data, tr.max_seq_length)
    kept = [e for e in train if _trainable(e)]
    if not kept:
        raise UserDataError(
            f"dataset {spec.dataset}: no example has a token to train on after tokenising "
            f"(max_seq_length {tr.max_seq_length} may cut off every completion)"
        )
    val = [
        e
        for e in tokenize_records(val_records, tokenizer, data, tr.max_seq_length)
        if _trainable(e)
    ]
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    return TextTrainSet(
        kept,
        val,
        batch_size=tr.batch_size,
        seed=tr.seed,
        max_len=tr.max_seq_length,
        packing=data.packing,
        pad_id=pad_id,
        dropped=len(train) - len(kept),
    )
