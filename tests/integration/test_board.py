"""TensorBoard events of a job run in process (`run_job`, `file://` bucket): every optimizer
step's `train/loss` and `train/learning_rate`, `eval/loss` at the end, one run per attempt,
uploaded with each checkpoint and at the end of the attempt; resume is unaffected."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from lorajobs.jobspecs.failures import Preempted
from lorajobs.jobspecs.models import TextJobSpec
from lorajobs.worker.board import read_events, scalars
from lorajobs.worker.context import WorkerContext
from lorajobs.worker.entrypoint import run_job

pytestmark = pytest.mark.slow


def _events(bucket: Path, job: str, attempt: int) -> dict[str, list[tuple[int, float]]]:
    """The scalars of the attempt's event files in the bucket ({} when there are none)."""
    folder = bucket / "jobs" / job / "tensorboard" / f"attempt-{attempt}"
    files = sorted(folder.glob("events.out.tfevents.*")) if folder.is_dir() else []
    out: dict[str, list[tuple[int, float]]] = {}
    for f in files:
        for tag, points in scalars(read_events(f.read_bytes())).items():
            out.setdefault(tag, []).extend(points)
    return out


def test_a_text_job_leaves_its_tensorboard_events_in_the_bucket(
    tiny_text_model: Path, tiny_text_dataset: Path, tmp_path: Path
) -> None:
    bucket = tmp_path / "bucket"
    shutil.copytree(tiny_text_model, bucket / "models" / "tiny-llama")
    spec = TextJobSpec.model_validate(
        {
            "kind": "text",
            "name": "tiny-text",
            "base_model": (bucket / "models" / "tiny-llama").as_uri(),
            "dataset": tiny_text_dataset.as_uri(),
            "data": {"validation_split": 0.25},
            "lora": {"rank": 4, "alpha": 8},
            "training": {
                "steps": 10,
                "batch_size": 4,
                "learning_rate": 5e-3,
                "warmup_steps": 2,
                "max_seq_length": 64,
                "checkpoint_every": 5,
            },
        }
    )
    seen_at_last_step: list[dict[str, Any]] = []

    def report(p: dict[str, Any]) -> None:
        if p["step"] == p["total_steps"]:  # before the last checkpoint and the final upload
            seen_at_last_step.append(_events(bucket, "job-tb", 2))

    def ctx(attempt: int, stop: int | None = None) -> WorkerContext:
        return WorkerContext(
            job_id="job-tb",
            output_uri=bucket.as_uri(),
            cache_dir=tmp_path / "cache",
            attempt=attempt,
            threads=2,
            report=report,
            stop_after_step=stop,
            cpu_fallback=True,
        )

    # Attempt 1 stops after step 4 (as a preempted node would); its events are up.
    with pytest.raises(Preempted):
        run_job(spec, ctx(1, stop=4))
    first = _events(bucket, "job-tb", 1)
    assert [s for s, _ in first["train/loss"]] == [1, 2, 3, 4]
    assert [s for s, _ in first["train/learning_rate"]] == [1, 2, 3, 4]
    assert first["train/learning_rate"][0][1] == 0.0  # warmup starts at 0
    assert "eval/loss" not in first

    # Attempt 2 resumes at step 5 and finishes: its own run, steps 5-10, and the eval loss.
    result = run_job(spec, ctx(2))
    second = _events(bucket, "job-tb", 2)
    assert [s for s, _ in second["train/loss"]] == [5, 6, 7, 8, 9, 10]
    assert [s for s, _ in second["train/learning_rate"]] == [5, 6, 7, 8, 9, 10]
    metrics = result["metrics"]
    assert metrics["resumed_from_step"] == 4
    assert math.isclose(first["train/loss"][0][1], metrics["first_loss"], rel_tol=1e-6)
    assert math.isclose(second["train/loss"][-1][1], metrics["final_loss"], rel_tol=1e-6)
    [(step, eval_loss)] = second["eval/loss"]
    assert step == 10 and math.isclose(eval_loss, metrics["eval_loss"], rel_tol=1e-6)
    # Uploaded with the checkpoint of step 5: in the bucket before the attempt ended.
    [early] = seen_at_last_step
    assert [s for s, _ in early["train/loss"]] == [5]


def test_images_and_uploads_of_a_board(tmp_path: Path) -> None:
    from PIL import Image

    from lorajobs.worker.board import Board

    bucket = tmp_path / "bucket"
    board = Board.for_attempt(tmp_path / "work", bucket.as_uri(), "job1", 3)
    folder = bucket / "jobs" / "job1" / "tensorboard" / "attempt-3"
    board.upload()
    assert not folder.exists(), "nothing written, nothing uploaded"
    board.image("samples", Image.new("RGB", (8, 6), (255, 0, 0)), 7)
    board.close()
    board.scalar("train/loss", 1.0, 8)  # after close: ignored
    [events_file] = folder.glob("events.out.tfevents.*")
    events = read_events(events_file.read_bytes())
    [image] = [v.image for e in events for v in e.summary.value if v.tag == "samples"]
    assert (image.width, image.height) == (8, 6)
    assert image.encoded_image_string.startswith(b"\x89PNG")
    assert scalars(events) == {}
