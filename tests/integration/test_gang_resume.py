"""A gang's checkpoints without Ray: two processes joined by gloo run the worker as ranks 0 and 1
(what Ray Train starts on a cluster). With LoRA dropout on, so every rank draws from its own
stream, a gang stopped after a checkpoint and resumed by a new attempt of the same size ends
with the bytes of an uninterrupted one; only rank 0 wrote to the bucket; and a checkpoint
written by a gang is refused by a different world size."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.plugins.ranks import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STEPS, STOP = 8, 4
WEIGHTS = "adapter_model.safetensors"


def _spec(model: Path, data: Path, workers: int) -> dict[str, Any]:
    return {
        "kind": "text",
        "name": "gang",
        "base_model": str(model),
        "dataset": str(data),
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.1},
        "training": {
            "steps": STEPS,
            "batch_size": 4,
            "learning_rate": 1e-3,
            "seed": 0,
            "max_seq_length": 64,
            "checkpoint_every": 2,
        },
        "resources": {"gpus": workers, "cpus": 1},
    }


def test_a_gang_resumes_at_the_same_size_to_the_uninterrupted_bytes(
    tmp_path: Path, tiny_text_model: Path, tiny_text_dataset: Path
) -> None:
    bucket = tmp_path / "bucket"
    two = _spec(tiny_text_model, tiny_text_dataset, 2)
    calm = run_ranks(tmp_path, "calm", 2, two, bucket=bucket, job_id="calm")
    assert [o["ok"] for o in calm] == [True, True], calm
    assert "adapter_uri" in calm[0] and "adapter_uri" not in calm[1]  # rank 1 uploads nothing

    first = run_ranks(tmp_path, "first", 2, two, bucket=bucket, job_id="cut", stop=STOP)
    assert all("Preempted" in o["error"] for o in first), first
    steps = sorted(p.name for p in (bucket / "jobs" / "cut" / "checkpoints").iterdir())
    assert steps == ["step-2", "step-4"]
    state = json.loads((bucket / "jobs/cut/checkpoints/step-4/state.json").read_text())
    assert state["workers"] == 2 and len(state["rank_rng"]) == 2
    assert state["rank_rng"][0] != state["rank_rng"][1]  # each rank's own dropout stream

    # A different world size is refused, naming the checkpoint's.
    one = _spec(tiny_text_model, tiny_text_dataset, 1)
    other = run_ranks(tmp_path, "other", 1, one, bucket=bucket, job_id="cut", attempt=2)
    assert "thread count or number of GPUs" in other[0]["error"], other

    again = run_ranks(tmp_path, "again", 2, two, bucket=bucket, job_id="cut", attempt=2)
    assert [o["ok"] for o in again] == [True, True], again
    assert again[0]["metrics"]["resumed_from_step"] == STOP
    # Only rank 0 wrote the adapter, once per job; its bytes are the uninterrupted run's.
    assert sorted(p.name for p in (bucket / "adapters" / "gang").iterdir()) == ["calm", "cut"]
    a = (bucket / "adapters/gang/cut" / WEIGHTS).read_bytes()
    assert a == (bucket / "adapters/gang/calm" / WEIGHTS).read_bytes()
    assert again[0]["metrics"]["final_loss"] == calm[0]["metrics"]["final_loss"]
