"""Offset noise and min-SNR weighting: each changes what is learned, each repeats exactly, and
off (the default) leaves a run as it was."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from lorajobs.jobspecs import parse_spec
from lorajobs.jobspecs.models import ImageJobSpec
from lorajobs.worker.context import TrainOutput, WorkerContext
from lorajobs.worker.trainers.image.recipe import train
from tests.plugins.pipelines import v_prediction_copy
from tests.plugins.specs import WEIGHTS, sha256, spec_dict

pytestmark = pytest.mark.slow


def _spec(**training: Any) -> ImageJobSpec:
    spec = parse_spec(
        spec_dict(
            "image",
            "opts",
            "tiny-sd",
            "shapes",
            training={"steps": 3, "learning_rate": 1e-2, **training},
        )
    )
    assert isinstance(spec, ImageJobSpec)
    return spec


def _run(spec: ImageJobSpec, model: Path, data: Path, out: Path) -> tuple[str, TrainOutput]:
    ctx = WorkerContext(job_id="j", output_uri=out.as_uri(), cache_dir=out / "cache", threads=1)
    result = train(spec, model, data, out, ctx)
    return sha256(out / WEIGHTS["image"]), result


def test_noise_offset_and_min_snr_change_the_adapter_and_repeat(
    tiny_image_model: Path, tiny_image_dataset: Path, tmp_path: Path
) -> None:
    options: dict[str, dict[str, Any]] = {
        "off": {},
        "off-explicit": {"noise_offset": 0.0, "min_snr_gamma": None},
        "offset": {"noise_offset": 0.1},
        "offset-again": {"noise_offset": 0.1},
        "snr": {"min_snr_gamma": 5.0},
        "snr-again": {"min_snr_gamma": 5.0},
        "snr-gamma-1": {"min_snr_gamma": 1.0},
    }
    runs = {
        name: _run(_spec(**o), tiny_image_model, tiny_image_dataset, tmp_path / name)
        for name, o in options.items()
    }
    sha = {name: digest for name, (digest, _) in runs.items()}
    assert sha["off"] == sha["off-explicit"]
    assert sha["offset"] == sha["offset-again"] != sha["off"]
    assert sha["snr"] == sha["snr-again"] != sha["off"]
    assert sha["snr-gamma-1"] not in (sha["off"], sha["snr"])  # γ is used, not just a switch
    resolved = runs["offset"][1].resolved
    assert (resolved["noise_offset"], resolved["min_snr_gamma"]) == (0.1, None)
    resolved = runs["snr"][1].resolved
    assert (resolved["noise_offset"], resolved["min_snr_gamma"]) == (0.0, 5.0)


def test_min_snr_on_a_v_prediction_model(
    tiny_image_model: Path, tiny_image_dataset: Path, tmp_path: Path
) -> None:
    model = v_prediction_copy(tiny_image_model, tmp_path / "model-v")

    plain, _ = _run(_spec(), model, tiny_image_dataset, tmp_path / "plain")
    weighted, result = _run(_spec(min_snr_gamma=5.0), model, tiny_image_dataset, tmp_path / "w")
    assert result.resolved["prediction_type"] == "v_prediction"
    assert weighted != plain and math.isfinite(result.metrics["final_loss"])
