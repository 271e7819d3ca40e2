"""Small, fast job specs for the tiny models, shared by in-process and CLI tests.

Not a fixture plugin: plain helpers. `spec_dict` is the one place the test spec is written;
`write_spec` puts it in a YAML file for the CLI, `parse_spec(spec_dict(...))` validates it for
in-process tests.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

#: The adapter weights file of each kind (what determinism and resume compare).
WEIGHTS = {"image": "pytorch_lora_weights.safetensors", "text": "adapter_model.safetensors"}


def spec_dict(kind: str, name: str, base_model: str, dataset: str, **over: Any) -> dict[str, Any]:
    """A spec for the tiny models: 20 steps, rank 4, CPU, one thread. `training=` is merged
    into the defaults; every other keyword replaces its section."""
    training: dict[str, Any] = {"steps": 20, "batch_size": 2, "learning_rate": 1e-3, "seed": 0}
    training.update({"resolution": 64} if kind == "image" else {"max_seq_length": 64})
    training.update(over.pop("training", {}))
    spec: dict[str, Any] = {
        "kind": kind,
        "name": name,
        "base_model": base_model,
        "dataset": dataset,
        "lora": {"rank": 4, "alpha": 8},
        "training": training,
        "resources": {"gpus": 0, "cpus": 1},
    }
    spec.update(over)
    return spec


def write_spec(
    path: Path, kind: str, name: str, base_model: str, dataset: str, **over: Any
) -> Path:
    """`spec_dict(...)` written as YAML to `path`."""
    import yaml

    path.write_text(
        yaml.safe_dump(spec_dict(kind, name, base_model, dataset, **over), sort_keys=False)
    )
    return path


def tiny_inputs(request: pytest.FixtureRequest, kind: str) -> tuple[Path, Path]:
    """(tiny model, tiny dataset) of `kind`, for tests parametrized over both kinds."""
    return (
        request.getfixturevalue(f"tiny_{kind}_model"),
        request.getfixturevalue(f"tiny_{kind}_dataset"),
    )


def adapter_path(uri: str) -> Path:
    """The folder of a `file://` adapter URI (as `lorajobs run` prints it)."""
    return Path(uri.strip().removeprefix("file://"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
