"""Plain text datasets: JSONL rows with a `text` field, in one file or a folder of `*.jsonl`.

Every problem is a `UserDataError` that names the file and the line, so the user can fix the
data without reading a traceback. The other row formats (prompt/completion, alpaca, chat), loss
masks and packing live in `text_formats.py`, `chat.py`, `packing.py` and `text_dataset.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorajobs.jobspecs.failures import UserDataError
from lorajobs.worker.jsonl import JsonRow, read_rows


@dataclass(frozen=True)
class TextExample:
    """One row of training text and where it came from (for error messages)."""

    text: str
    source: str  # file path
    line: int  # 1-based


def jsonl_files(path: Path) -> list[Path]:
    """The files a dataset path stands for: the file itself, or a folder's `*.jsonl` (sorted)."""
    if path.is_file():
        return [path]
    if path.is_dir():
        # Sorted by relative path so the example order (and so the training) never depends on
        # the filesystem's listing order.
        found = [p for p in path.rglob("*.jsonl") if p.is_file() and not p.name.startswith(".")]
        return sorted(found, key=lambda p: p.relative_to(path).as_posix())
    raise UserDataError(f"dataset {path}: not found")


def _text_example(row: JsonRow) -> TextExample:
    if "text" not in row.data:
        raise UserDataError(f"{row.where}: missing the 'text' field")
    if not isinstance(row.data["text"], str):
        raise UserDataError(
            f"{row.where}: 'text' must be a string, got {type(row.data['text']).__name__}"
        )
    return TextExample(row.data["text"], row.source, row.line)


def read_jsonl(path: Path) -> list[TextExample]:
    """All `text` examples of one JSONL file, in file order."""
    return [_text_example(row) for row in read_rows(path)]


def load_text_examples(path: Path) -> list[TextExample]:
    """Every example under a dataset path; raise `UserDataError` if there are none."""
    examples = [ex for f in jsonl_files(path) for ex in read_jsonl(f)]
    if not examples:
        raise UserDataError(f"dataset {path}: no examples")
    return examples


def tokenize_examples(
    examples: list[TextExample], tokenizer: Any, max_seq_length: int
) -> list[list[int]]:
    """Token ids per example: the tokenizer's own specials (e.g. BOS), then EOS, truncated."""
    texts = [ex.text for ex in examples]
    # Truncate in the tokenizer (no over-length warnings), then add EOS where it still fits:
    # the same as "append EOS, then truncate".
    ids: list[list[int]] = tokenizer(
        texts, add_special_tokens=True, truncation=True, max_length=max_seq_length
    )["input_ids"]
    eos = tokenizer.eos_token_id
    out = []
    for seq in ids:
        seq = list(seq)
        if eos is not None and len(seq) < max_seq_length and (not seq or seq[-1] != eos):
            seq.append(eos)
        out.append(seq)
    return out
