"""Job specs: the contract between users, the queue and the worker. Imports nothing of ours.

Names are loaded on first use (PEP 562), so importing the failure vocabulary
(`lorajobs.jobspecs.failures`) does not load pydantic and the spec models: `lorajobs --help`
and the light commands stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "LoraJobsError": "failures",
    "SpecError": "failures",
    "json_schema": "loader",
    "load_spec": "loader",
    "load_spec_text": "loader",
    "parse_spec": "loader",
    "resolve_local_paths": "loader",
    "spec_to_dict": "loader",
    "AnyJobSpec": "models",
    "ImageJobSpec": "models",
    "ImageTraining": "models",
    "LoraSettings": "models",
    "Resources": "models",
    "TextJobSpec": "models",
    "TextTraining": "models",
}
__all__ = [
    "AnyJobSpec",
    "ImageJobSpec",
    "ImageTraining",
    "LoraJobsError",
    "LoraSettings",
    "Resources",
    "SpecError",
    "TextJobSpec",
    "TextTraining",
    "json_schema",
    "load_spec",
    "load_spec_text",
    "parse_spec",
    "resolve_local_paths",
    "spec_to_dict",
]

if TYPE_CHECKING:
    from lorajobs.jobspecs.failures import LoraJobsError, SpecError
    from lorajobs.jobspecs.loader import (
        json_schema,
        load_spec,
        load_spec_text,
        parse_spec,
        resolve_local_paths,
        spec_to_dict,
    )
    from lorajobs.jobspecs.models import (
        AnyJobSpec,
        ImageJobSpec,
        ImageTraining,
        LoraSettings,
        Resources,
        TextJobSpec,
        TextTraining,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
