"""Image trainer settings: the encode-once cache (node and bucket), the per-step path when the
data options make encodings vary, epochs over buckets, and resume through both paths."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from lorajobs.jobspecs.failures import Preempted
from lorajobs.jobspecs.models import ImageJobSpec
from lorajobs.storage.checkpoints import CheckpointStore
from lorajobs.worker.context import TrainOutput, WorkerContext
from lorajobs.worker.trainers.image.recipe import WEIGHTS_NAME, train

pytestmark = pytest.mark.slow


def _spec(data: dict[str, Any] | None = None, **training: Any) -> ImageJobSpec:
    tr = {"steps": 3, "batch_size": 2, "resolution": 64, "learning_rate": 1e-3, **training}
    if "epochs" in tr:
        tr.pop("steps")
    return ImageJobSpec.model_validate(
        {
            "kind": "image",
            "name": "img",
            "base_model": "m",
            "dataset": "d",
            "lora": {"rank": 4, "alpha": 8},
            "training": tr,
            "data": data or {},
        }
    )


def _ctx(root: Path, cache: str, job: str = "j", **kw: Any) -> WorkerContext:
    return WorkerContext(
        job_id=job, output_uri=(root / "bucket").as_uri(), cache_dir=root / cache, threads=1, **kw
    )


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_latents_are_encoded_once_and_shared_through_the_bucket(
    tiny_image_model: Path, tiny_image_dataset: Path, tmp_path: Path
) -> None:
    spec = _spec({"flip_p": 0.5})
    bucket = (tmp_path / "bucket").as_uri()
    first = train(
        spec,
        tiny_image_model,
        tiny_image_dataset,
        tmp_path / "a",
        _ctx(tmp_path, "node1", latent_cache_uri=bucket),
    )
    assert first.metrics["latents_cached"] and first.metrics["text_cached"]
    shared = sorted((tmp_path / "bucket" / "cache" / "latents").rglob("*.safetensors"))
    assert len(shared) == 16  # 8 images x (plain, flipped)

    # Another node (empty local cache) takes the bucket's latents: same adapter bytes.
    second = train(
        spec,
        tiny_image_model,
        tiny_image_dataset,
        tmp_path / "b",
        _ctx(tmp_path, "node2", latent_cache_uri=bucket),
    )
    assert len(list((tmp_path / "node2" / "latents").rglob("*.safetensors"))) == 16
    assert _sha(tmp_path / "a" / WEIGHTS_NAME) == _sha(tmp_path / "b" / WEIGHTS_NAME)
    assert second.metrics["final_loss"] == first.metrics["final_loss"]


def test_varying_data_options_encode_every_step(
    tiny_image_model: Path, tiny_image_dataset: Path, tmp_path: Path
) -> None:
    spec = _spec({"crop": "random", "caption_dropout": 0.5, "shuffle_tags": True})
    out = train(spec, tiny_image_model, tiny_image_dataset, tmp_path / "o", _ctx(tmp_path, "n"))
    assert not out.metrics["latents_cached"] and not out.metrics["text_cached"]
    assert not (tmp_path / "n" / "latents").exists()


def test_epochs_count_bucket_batches(
    tiny_image_model: Path, tiny_image_dataset: Path, tmp_path: Path
) -> None:
    out = train(
        _spec(epochs=2, gradient_accumulation_steps=2),
        tiny_image_model,
        tiny_image_dataset,
        tmp_path / "o",
        _ctx(tmp_path, "n"),
    )
    assert out.metrics["steps"] == 2 * 2  # 8 images / batch 2 = 4 batches = 2 steps of 2
    assert out.resolved["epochs"] == 2.0


def test_resume_on_the_per_step_encoding_path(
    tiny_image_model: Path, tiny_image_dataset: Path, tmp_path: Path
) -> None:
    spec = _spec(
        {"crop": "random", "flip_p": 0.5, "caption_dropout": 0.3}, steps=8, checkpoint_every=0
    )
    straight = train(
        spec, tiny_image_model, tiny_image_dataset, tmp_path / "s", _ctx(tmp_path, "n", job="s")
    )
    store = CheckpointStore.for_job((tmp_path / "bucket").as_uri(), "r")
    with pytest.raises(Preempted):
        train(
            spec,
            tiny_image_model,
            tiny_image_dataset,
            tmp_path / "r1",
            _ctx(tmp_path, "n", job="r", checkpoints=store, stop_after_step=4),
        )
    resumed: TrainOutput = train(
        spec,
        tiny_image_model,
        tiny_image_dataset,
        tmp_path / "r2",
        _ctx(tmp_path, "n", job="r", checkpoints=store),
    )
    assert resumed.metrics["resumed_from_step"] == 4
    assert _sha(tmp_path / "r2" / WEIGHTS_NAME) == _sha(tmp_path / "s" / WEIGHTS_NAME)
    assert resumed.metrics["loss_curve"] == straight.metrics["loss_curve"]
