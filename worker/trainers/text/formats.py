"""Text row formats: each JSONL row becomes segments of text, each trained on or not.

| format       | row fields                              | loss on                  |
|--------------|-----------------------------------------|--------------------------|
| `text`       | `text`                                  | everything               |
| `completion` | `prompt`, `completion`                  | `completion`             |
| `alpaca`     | `instruction`, `input` (optional), `output` | `output` (the prompt is the Alpaca template) |
| `chat`       | `messages: [{role, content}]`           | assistant turns (rendered with a chat template, see `chat.py`) |

`auto` picks the format from the first row's fields; every row must then have that format.
Errors are `UserDataError`s naming the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorajobs.jobspecs.failures import UserDataError
from lorajobs.worker.jsonl import JsonRow, type_name

FORMATS = ("text", "completion", "alpaca", "chat")
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})

# The Stanford Alpaca prompts, verbatim: models and tools trained on Alpaca data expect them.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Segment:
    """A piece of an example's text; `train` says whether its tokens carry loss."""

    text: str
    train: bool


@dataclass(frozen=True)
class Record:
    """One row in a format-neutral shape: segments, or chat messages to render."""

    format: str
    source: str
    line: int
    segments: tuple[Segment, ...] = ()
    messages: tuple[dict[str, str], ...] = ()

    @property
    def where(self) -> str:
        return f"{self.source}: line {self.line}"


def detect_format(row: JsonRow) -> str:
    """The format a row's fields say it is in."""
    keys = row.data.keys()
    if "messages" in keys:
        return "chat"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "completion"
    if "text" in keys:
        return "text"
    fields = ", ".join(sorted(keys)) or "none"
    raise UserDataError(
        f"{row.where}: unknown format (fields: {fields}); expected text, prompt+completion, "
        "instruction+output (alpaca) or messages (chat)"
    )


def to_record(row: JsonRow, fmt: str) -> Record:
    """Check a row against `fmt` and turn it into a Record."""
    d, where = row.data, row.where
    if fmt == "text":
        return Record(fmt, row.source, row.line, (Segment(_str(d, "text", where), True),))
    if fmt == "completion":
        prompt, completion = _str(d, "prompt", where), _str(d, "completion", where)
        return Record(
            fmt, row.source, row.line, (Segment(prompt, False), Segment(completion, True))
        )
    if fmt == "alpaca":
        instruction, output = _str(d, "instruction", where), _str(d, "output", where)
        extra = _str(d, "input", where, optional=True)
        template = ALPACA_PROMPT_WITH_INPUT if extra else ALPACA_PROMPT
        prompt = template.format(instruction=instruction, input=extra)
        return Record(fmt, row.source, row.line, (Segment(prompt, False), Segment(output, True)))
    if fmt == "chat":
        return Record(fmt, row.source, row.line, messages=_messages(d, where))
    raise UserDataError(f"{where}: unknown format {fmt!r} (known: {', '.join(FORMATS)})")


def _str(d: dict[str, Any], key: str, where: str, *, optional: bool = False) -> str:
    if key not in d or (optional and d[key] is None):
        if optional:
            return ""
        raise UserDataError(f"{where}: missing the {key!r} field")
    if not isinstance(d[key], str):
        raise UserDataError(f"{where}: {key!r} must be a string, got {type_name(d[key])}")
    return d[key]


def _messages(d: dict[str, Any], where: str) -> tuple[dict[str, str], ...]:
    msgs = d.get("messages")
    if not isinstance(msgs, list) or not msgs:
        got = (
            "missing"
            if msgs is None
            else f"got {type_name(msgs)}"
            if not isinstance(msgs, list)
            else "got an empty array"
        )
        raise UserDataError(f"{where}: 'messages' must be a non-empty array ({got})")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise UserDataError(f"{where}: messages[{i}] must be an object, got {type_name(m)}")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise UserDataError(
                f"{where}: messages[{i}].role must be one of {', '.join(sorted(CHAT_ROLES))} "
                f"(got {role!r})"
            )
        if not isinstance(content, str):
            raise UserDataError(
                f"{where}: messages[{i}].content must be a string, got {type_name(content)}"
            )
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise UserDataError(f"{where}: chat example has no assistant turn (nothing to train on)")
    return tuple(out)


def to_records(rows: list[JsonRow], fmt: str = "auto") -> list[Record]:
    """Rows → Records; `auto` takes the format of the first row and holds every row to it."""
    if not rows:
        return []
    if fmt == "auto":
        fmt = detect_format(rows[0])
    elif fmt not in FORMATS:
        raise UserDataError(
            f"{rows[0].source}: unknown format {fmt!r} (known: {', '.join(FORMATS)})"
        )
    return [to_record(row, fmt) for row in rows]
