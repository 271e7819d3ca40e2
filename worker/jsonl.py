"""JSONL rows with their file and line: the one parser behind every JSONL dataset format.

A bad byte, bad JSON or a non-object fails its own line with a `UserDataError` that names the
file and the 1-based line; blank lines are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorajobs.jobspecs.failures import UserDataError


@dataclass(frozen=True)
class JsonRow:
    """One JSON object of a JSONL file."""

    data: dict[str, Any]
    source: str  # file path
    line: int  # 1-based

    @property
    def where(self) -> str:
        """`file: line N`, the prefix of every error about this row."""
        return f"{self.source}: line {self.line}"


def parse_line(raw: bytes, source: str, line: int) -> JsonRow | None:
    """One line as a JSON object; None for a blank line."""
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
    return JsonRow(row, source, line)


def read_rows(path: Path) -> list[JsonRow]:
    """Every JSON object of one JSONL file, in file order."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserDataError(f"{path}: cannot read ({err.strerror})") from None
    # Split on bytes, not text: a bad byte then fails its own line, not the whole file.
    out = []
    for i, raw in enumerate(data.split(b"\n"), start=1):
        row = parse_line(raw.rstrip(b"\r"), str(path), i)
        if row is not None:
            out.append(row)
    return out


def type_name(value: Any) -> str:
    """The JSON name of a value's type, for error messages."""
    if value is None:
        return "null"
    return {
        bool: "boolean",
        int: "number",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }.get(type(value), type(value).__name__)
