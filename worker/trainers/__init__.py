"""The trainer registry: one `train` function per job kind, imported only when asked for.

Importing this module imports no torch, so the control plane can name trainers cheaply.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorajobs.jobspecs.failures import InvalidInput
from lorajobs.worker.context import TrainOutput, WorkerContext

# train(spec, model_dir, data_path, out_dir, ctx) -> TrainOutput
TrainFn = Callable[[Any, Path, Path, Path, WorkerContext], TrainOutput]

_TRAINERS: dict[str, str] = {
    "image": "lorajobs.worker.trainers.image.recipe",
    "text": "lorajobs.worker.trainers.text.recipe",
}


def trainer_kinds() -> list[str]:
    """The job kinds a trainer is registered for."""
    return sorted(_TRAINERS)


def get_trainer(kind: str) -> TrainFn:
    """The `train` function for `kind` ("image" or "text")."""
    if kind not in _TRAINERS:
        known = ", ".join(trainer_kinds())
        raise InvalidInput(f"no trainer for job kind {kind!r} (known: {known})")
    module = importlib.import_module(_TRAINERS[kind])
    train: TrainFn = module.train
    return train
