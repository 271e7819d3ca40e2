"""Text datasets: JSONL rows with a `text` field, in one file or a folder of `*.jsonl` files.

Every problem is a `UserDataError` that names the file and the line, so the user can fix the
data without reading a traceback. Tokenising happens once, before training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobspecs.errors import UserDataError


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


def _parse_line(raw: bytes, source: str, line: int) -> TextExample | None:
    where = f"{source}: line {line}"
    try:
        # utf-8-sig: a byte-order mark at the start of a file is common and harmless.
        text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
    except UnicodeDecodeError as err:
        raise UserDataError(f"{where}: invalid UTF-8 at byte {err.start}") from None
    if not text.strip():
        return None  # blank lines (often a trailing one) are not examples
    try:
        row: Any = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserDataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise UserDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "text" not in row:
        raise UserDataError(f"{where}: missing the 'text' field")
    if not isinstance(row["text"], str):
        raise UserDataError(f"{where}: 'text' must be a string, got {type(row['text']).__name__}")
    return TextExample(row["text"], source, line)


def read_jsonl(path: Path) -> list[TextExample]:
    """All examples of one JSONL file, in file order."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserDataError(f"{path}: cannot read ({err.strerror})") from None
    # Split on bytes, not text: a bad byte then fails its own line, not the whole file.
    out = []
    for i, raw in enumerate(data.split(b"\n"), start=1):
        ex = _parse_line(raw.rstrip(b"\r"), str(path), i)
        if ex is not None:
            out.append(ex)
    return out


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
