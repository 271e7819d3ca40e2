"""Checkpoints and resume: 10 steps + resume + 10 steps == 20 steps straight, bit for bit.

In-process here (the trainer with a checkpoint store); across two `lorajobs run` processes in
tests/e2e/test_reproduce.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lorajobs.jobspecs import parse_spec
from lorajobs.jobspecs.failures import InvalidInput, Preempted
from lorajobs.jobspecs.models import AnyJobSpec
from lorajobs.storage.checkpoints import CheckpointStore
from lorajobs.worker.context import WorkerContext
from lorajobs.worker.trainers import get_trainer
from tests.plugins.specs import WEIGHTS, sha256, spec_dict, tiny_inputs

pytestmark = pytest.mark.slow

# Everything the resume must carry: dropout (global RNG), accumulation, a warmup + cosine
# schedule (the LR position), the image trainer's noise generator, AdamW moments.
TRAINING: dict[str, Any] = {
    "steps": 20,
    "batch_size": 2,
    "gradient_accumulation_steps": 2,
    "learning_rate": 5e-3,
    "lr_scheduler": "cosine",
    "warmup_steps": 3,
    "checkpoint_every": 4,
    "keep_checkpoints": 2,
    "seed": 5,
}


def _spec(kind: str, **training: Any) -> AnyJobSpec:
    return parse_spec(
        spec_dict(
            kind,
            "r",
            "m",
            "d",
            lora={"rank": 4, "alpha": 8, "dropout": 0.1},
            training={**TRAINING, **training},
        )
    )


def _ctx(bucket: Path, job: str, stop: int | None = None) -> WorkerContext:
    return WorkerContext(
        job_id=job,
        output_uri=bucket.as_uri(),
        cache_dir=bucket,
        threads=1,
        checkpoints=CheckpointStore.for_job(bucket.as_uri(), job),
        stop_after_step=stop,
    )


@pytest.mark.parametrize("kind", ["image", "text"])
def test_resume_gives_the_same_adapter_as_a_straight_run(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    model, data = tiny_inputs(request, kind)
    train = get_trainer(kind)
    bucket = tmp_path / "bucket"
    spec = _spec(kind)

    straight = train(spec, model, data, tmp_path / "straight", _ctx(bucket, "straight"))
    assert straight.metrics["resumed_from_step"] == 0

    with pytest.raises(Preempted, match="after step 10"):
        train(spec, model, data, tmp_path / "first", _ctx(bucket, "split", stop=10))
    store = CheckpointStore.for_job(bucket.as_uri(), "split")
    assert store.steps() == [8, 10]  # every 4 steps (4, 8) + the stop at 10; keep the last 2
    resumed = train(spec, model, data, tmp_path / "second", _ctx(bucket, "split"))

    assert resumed.metrics["resumed_from_step"] == 10
    second, straight_dir = tmp_path / "second", tmp_path / "straight"
    assert sha256(second / WEIGHTS[kind]) == sha256(straight_dir / WEIGHTS[kind])
    # The loss history travels in the checkpoint: the curve (and loss.png) are whole too.
    assert resumed.metrics["loss_curve"] == straight.metrics["loss_curve"]
    assert sha256(second / "loss.png") == sha256(straight_dir / "loss.png")
    assert store.steps() == [16, 20]


def test_a_checkpoint_without_its_marker_is_ignored(
    tiny_text_model: Path, tiny_text_dataset: Path, tmp_path: Path
) -> None:
    train = get_trainer("text")
    bucket = tmp_path / "bucket"
    spec = _spec("text", steps=6, checkpoint_every=3)
    with pytest.raises(Preempted):
        train(spec, tiny_text_model, tiny_text_dataset, tmp_path / "a", _ctx(bucket, "j", stop=5))
    ckpts = bucket / "jobs" / "j" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-3", "step-5"]
    (ckpts / "step-5" / "COMPLETE").unlink()  # as if the node died mid-upload

    out = train(spec, tiny_text_model, tiny_text_dataset, tmp_path / "b", _ctx(bucket, "j"))
    assert out.metrics["resumed_from_step"] == 3


def test_a_checkpoint_of_another_spec_is_refused(
    tiny_text_model: Path, tiny_text_dataset: Path, tmp_path: Path
) -> None:
    train = get_trainer("text")
    bucket = tmp_path / "bucket"
    with pytest.raises(Preempted):
        train(
            _spec("text", steps=4),
            tiny_text_model,
            tiny_text_dataset,
            tmp_path / "a",
            _ctx(bucket, "j", stop=2),
        )
    with pytest.raises(InvalidInput, match="different spec"):
        train(
            _spec("text", steps=4, learning_rate=1e-3),
            tiny_text_model,
            tiny_text_dataset,
            tmp_path / "b",
            _ctx(bucket, "j"),
        )
