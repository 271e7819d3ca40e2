"""Job specs: the contract between users, the queue and the worker. Imports neither of them."""

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
