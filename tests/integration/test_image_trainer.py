"""The image trainer end to end on a tiny SD-1.x pipeline: files, hashes, loss and loading."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors import safe_open

from lorajobs.jobspecs.failures import InvalidInput
from lorajobs.jobspecs.models import ImageJobSpec
from lorajobs.worker.context import TrainOutput, WorkerContext
from lorajobs.worker.trainers.image.recipe import WEIGHTS_NAME, train
from lorajobs.worker.trainers.image.tiny import build_tiny_image_model
from tests.plugins.pipelines import pipeline, render, v_prediction_copy

pytestmark = pytest.mark.slow

THREADS = 1  # pinned (the UNet differs between thread counts); 1 stays fast on a busy machine


def _spec(lora: dict[str, Any] | None = None, **training: Any) -> ImageJobSpec:
    training = {"steps": 4, "batch_size": 2, "resolution": 64, "learning_rate": 1e-3, **training}
    return ImageJobSpec(
        kind="image",
        name="tiny",
        base_model="tiny-sd",
        dataset="shapes",
        lora={"rank": 4, "alpha": 8.0, **(lora or {})},
        training=training,
    )


def _train(
    spec: ImageJobSpec, model: Path, data: Path, out: Path
) -> tuple[TrainOutput, list[dict[str, Any]]]:
    reports: list[dict[str, Any]] = []
    ctx = WorkerContext(
        job_id="job",
        output_uri="file:///unused",
        cache_dir=out,
        threads=THREADS,
        report=reports.append,
    )
    return train(spec, model, data, out, ctx), reports


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def learned(
    tiny_image_model: Path, tiny_image_dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, TrainOutput]:
    """A LoRA trained long and hard enough (120 steps, lr 1e-2) to learn visibly."""
    out = tmp_path_factory.mktemp("learned-lora")
    spec = _spec(steps=120, learning_rate=1e-2)
    result, _ = _train(spec, tiny_image_model, tiny_image_dataset, out)
    return out, result


def test_trains_and_writes_a_diffusers_lora(
    tiny_image_model: Path, tiny_image_dataset: Path, tmp_path: Path
) -> None:
    result, reports = _train(_spec(), tiny_image_model, tiny_image_dataset, tmp_path)

    assert result.files == [WEIGHTS_NAME, "tiny.safetensors", "loss.png"]  # + kohya file
    assert result.deterministic == [WEIGHTS_NAME]
    assert result.metrics["resumed_from_step"] == 0
    assert math.isfinite(result.metrics["first_loss"])
    assert math.isfinite(result.metrics["final_loss"])
    assert result.metrics["steps"] == 4 and result.metrics["images"] == 8
    assert len(result.metrics["loss_curve"]) == 4  # one value per step below 50 steps
    assert result.resolved["target_modules"] == ["to_k", "to_out.0", "to_q", "to_v"]
    assert result.resolved["prediction_type"] == "epsilon"
    assert result.resolved["alpha"] == 8.0 and result.resolved["rank"] == 4
    assert reports[-1]["step"] == 4 and reports[-1]["total_steps"] == 4
    assert set(reports[-1]) == {"step", "total_steps", "loss", "it_per_s"}

    with safe_open(tmp_path / WEIGHTS_NAME, "pt") as f:
        keys = list(f.keys())
        header = f.metadata()
    assert keys and all(k.startswith("unet.") and ".lora." in k for k in keys)
    assert {k.rsplit(".", 2)[-2] for k in keys} == {"down", "up"}
    meta = json.loads(header["lora_adapter_metadata"])
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 8.0
    assert meta["unet.target_modules"] == ["to_k", "to_out.0", "to_q", "to_v"]
    assert not (tmp_path / "lorajobs.json").exists()  # the sidecar is the entrypoint's job


def test_same_spec_gives_the_same_bytes(
    tiny_image_model: Path, tiny_image_dataset: Path, tmp_path: Path
) -> None:
    spec = _spec(steps=3, lora={"dropout": 0.1})  # dropout too: the global RNG must be seeded
    other_seed = _spec(steps=3, seed=1, lora={"dropout": 0.1})
    _train(spec, tiny_image_model, tiny_image_dataset, tmp_path / "a")
    _train(spec, tiny_image_model, tiny_image_dataset, tmp_path / "b")
    _train(other_seed, tiny_image_model, tiny_image_dataset, tmp_path / "c")

    a, b, c = (_sha256(tmp_path / d / WEIGHTS_NAME) for d in "abc")
    assert a == b
    assert a != c  # and the seed matters


def test_loss_falls_on_a_learnable_set(learned: tuple[Path, TrainOutput]) -> None:
    _, result = learned
    curve = result.metrics["loss_curve"]  # 60 values, each the mean of 2 steps
    assert result.metrics["loss_curve_every"] == 2 and len(curve) == 60
    first, last = np.mean(curve[:5]), np.mean(curve[-5:])  # 10 steps each
    assert last < 0.95 * first, (first, last)


def test_adapter_loads_into_a_pipeline_with_its_alpha(
    learned: tuple[Path, TrainOutput], tiny_image_model: Path
) -> None:
    out, _ = learned

    def generate(with_lora: bool) -> np.ndarray:
        pipe = pipeline(tiny_image_model, out if with_lora else None)
        if with_lora:
            (config,) = pipe.unet.peft_config.values()
            # Alpha survives the round trip: without the header metadata it loads as alpha = r.
            assert config.lora_alpha == 8.0 and config.r == 4
        return render(pipe)

    base, base_again, adapted = generate(False), generate(False), generate(True)
    assert np.array_equal(base, base_again)  # the comparison itself is deterministic
    assert np.abs(adapted - base).mean() > 0.01


def test_v_prediction_models_train_on_velocity(
    tiny_image_model: Path, tiny_image_dataset: Path, tmp_path: Path
) -> None:
    model = v_prediction_copy(tiny_image_model, tmp_path / "model-v")

    result, _ = _train(_spec(steps=2), model, tiny_image_dataset, tmp_path / "out")

    assert result.resolved["prediction_type"] == "v_prediction"
    assert math.isfinite(result.metrics["final_loss"])


def test_unknown_target_modules_are_the_users_error(
    tiny_image_model: Path, tiny_image_dataset: Path, tmp_path: Path
) -> None:
    spec = _spec(lora={"target_modules": ["no_such_layer"]})
    with pytest.raises(InvalidInput, match="no_such_layer"):
        _train(spec, tiny_image_model, tiny_image_dataset, tmp_path)


def test_tiny_model_rebuilds_to_the_same_bytes(tiny_image_model: Path, tmp_path: Path) -> None:
    again = build_tiny_image_model(tmp_path / "again", seed=0)

    def listing(root: Path) -> list[Path]:
        return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())

    files = listing(tiny_image_model)
    assert files == listing(again)
    assert all(_sha256(tiny_image_model / f) == _sha256(again / f) for f in files)
