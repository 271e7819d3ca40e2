"""Load and validate job specs from YAML, reporting every problem at once."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lorajobs.jobspecs.failures import SpecError
from lorajobs.jobspecs.models import JOB_SPEC_ADAPTER, AnyJobSpec


def _field_path(loc: tuple[Any, ...]) -> str:
    # Drop the union tag pydantic inserts ("image"/"text") so paths read like the YAML.
    parts = [str(p) for p in loc if p not in ("image", "text")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "(top level)"


_NAMED = re.compile(r"^[a-z_]+(\.[a-z_]+)+ ")


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def problems_from(err: ValidationError) -> list[str]:
    """One line per pydantic error: `field.path: message (got VALUE)`."""
    out = []
    for e in err.errors(include_url=False):
        msg = e["msg"].removeprefix("Value error, ")
        # A check across sections (a model validator) names its own field: no "(top level)".
        names_field = _field_path(e["loc"]) == "(top level)" and _NAMED.match(msg)
        line = msg if names_field else f"{_field_path(e['loc'])}: {msg}"
        if e["type"] not in ("missing",) and "input" in e and not isinstance(e["input"], dict):
            line += f" (got {_short(e['input'])})"
        out.append(line)
    return out


def parse_spec(data: Any, source: str = "spec") -> AnyJobSpec:
    """Validate an already-parsed mapping; raise SpecError listing every problem."""
    if not isinstance(data, dict):
        kind = "empty" if data is None else type(data).__name__
        raise SpecError(source, [f"expected a mapping of fields at the top level, got {kind}"])
    if "kind" not in data:
        raise SpecError(source, ["kind: field required (one of: image, text)"])
    if data["kind"] not in ("image", "text"):
        raise SpecError(source, [f"kind: must be 'image' or 'text' (got {_short(data['kind'])})"])
    try:
        return JOB_SPEC_ADAPTER.validate_python(data)
    except ValidationError as err:
        raise SpecError(source, problems_from(err)) from None


def load_yaml(text: str, source: str = "spec") -> Any:
    """Parse YAML text safely (no arbitrary object construction); SpecError naming the line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(source, [f"not valid YAML{where}: {problem}"]) from None


def load_spec_text(text: str, source: str = "spec") -> AnyJobSpec:
    """Parse YAML text and validate it."""
    return parse_spec(load_yaml(text, source), source)


def load_spec(path: str | Path) -> AnyJobSpec:
    """Read and validate one spec file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(str(p), ["file not found"]) from None
    except IsADirectoryError:
        raise SpecError(str(p), ["is a directory, not a spec file"]) from None
    except UnicodeDecodeError:
        raise SpecError(str(p), ["not UTF-8 text"]) from None
    return load_spec_text(text, str(p))


def spec_to_dict(spec: AnyJobSpec) -> dict[str, Any]:
    """Canonical JSON-able form of a spec (what the queue stores and the sidecar records)."""
    return spec.model_dump(mode="json")


def json_schema() -> dict[str, Any]:
    """JSON Schema of a job spec, for YAML editors (yaml-language-server) and validation."""
    schema = JOB_SPEC_ADAPTER.json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "lorajobs job spec"
    return schema


#: `org/name` or `org/name@revision`, as the Hugging Face hub names repositories.
_HUB_ID = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9_-]*(?:[.][A-Za-z0-9_-]+)*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?"
)


def _looks_like_uri(value: str) -> bool:
    return "://" in value


def resolve_local_paths(spec: AnyJobSpec, base_dir: Path, source: str | None = None) -> AnyJobSpec:
    """Make local `base_model` / `dataset` paths absolute, relative to the spec file's folder
    (`base_dir`), and refuse one that does not exist (SpecError naming the resolved path).

    The worker runs in another directory (and, on a cluster, another machine), so a relative
    path only means something where the spec was written, and a path missing here is almost
    always a typo that would queue a job bound to fail. URIs (`s3://`, and `file://` for a path
    that only the workers have) are left alone, and so is a `base_model` of the hub's
    `org/name` form when no such local path exists.
    """
    update: dict[str, str] = {}
    problems: list[str] = []
    for field in ("base_model", "dataset"):
        value: str = getattr(spec, field)
        if _looks_like_uri(value):
            continue
        p = Path(value).expanduser()
        candidate = (p if p.is_absolute() else (base_dir / p)).resolve()
        if not candidate.exists():
            if field == "base_model" and not p.is_absolute() and _HUB_ID.fullmatch(value):
                continue  # a hub id such as "stabilityai/sd-turbo"
            where = "" if p.is_absolute() else f" (relative paths are read from {base_dir})"
            problems.append(f"{field}: {candidate} does not exist{where}")
            continue
        update[field] = str(candidate)
    if problems:
        raise SpecError(source or str(base_dir), problems)
    return spec.model_copy(update=update) if update else spec
