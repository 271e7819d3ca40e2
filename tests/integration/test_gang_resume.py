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

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STEPS, STOP = 8, 4
WEIGHTS = "adapter_model.safetensors"


def _spec(model: str, data: str, workers: int) -> Any:
    from lorajobs.jobspecs import parse_spec

    return parse_spec(
        {
            "kind": "text",
            "name": "gang",
            "base_model": model,
            "dataset": data,
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
    )


def _rank(rank: int, world: int, args: dict[str, Any]) -> None:
    """One rank (spawned): run_job as rank `rank`; its outcome in <out>/rank-<r>.json."""
    import torch.distributed as dist

    from lorajobs.jobspecs.failures import LoraJobsError
    from lorajobs.worker.context import WorkerContext
    from lorajobs.worker.entrypoint import run_job

    dist.init_process_group("gloo", init_method=args["init"], rank=rank, world_size=world)
    try:
        ctx = WorkerContext(
            job_id=args["job_id"],
            output_uri=args["bucket"],
            cache_dir=Path(args["cache"]),
            attempt=args["attempt"],
            cpu_fallback=True,
            stop_after_step=args["stop"],
            rank=rank,
            world_size=world,
        )
        try:
            out: dict[str, Any] = {
                "ok": True,
                **run_job(_spec(args["model"], args["data"], world), ctx),
            }
        except LoraJobsError as err:
            out = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        Path(args["out"], f"rank-{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def _gang(tmp: Path, name: str, world: int, **args: Any) -> list[dict[str, Any]]:
    """Run a gang of `world` processes to the end; each rank's outcome."""
    import torch.multiprocessing as mp

    out = tmp / name
    out.mkdir()
    args = {**args, "init": f"file://{out / 'rendezvous'}", "out": str(out)}
    mp.spawn(_rank, args=(world, args), nprocs=world, join=True)
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(world)]


def test_a_gang_resumes_at_the_same_size_to_the_uninterrupted_bytes(
    tmp_path: Path, tiny_text_model: Path, tiny_text_dataset: Path
) -> None:
    bucket = tmp_path / "bucket"
    base = {
        "bucket": f"file://{bucket}",
        "cache": str(tmp_path / "cache"),
        "model": str(tiny_text_model),
        "data": str(tiny_text_dataset),
    }
    calm = _gang(tmp_path, "calm", 2, job_id="calm", attempt=1, stop=None, **base)
    assert [o["ok"] for o in calm] == [True, True], calm
    assert "adapter_uri" in calm[0] and "adapter_uri" not in calm[1]  # rank 1 uploads nothing

    first = _gang(tmp_path, "first", 2, job_id="cut", attempt=1, stop=STOP, **base)
    assert all("Preempted" in o["error"] for o in first), first
    steps = sorted(p.name for p in (bucket / "jobs" / "cut" / "checkpoints").iterdir())
    assert steps == ["step-2", "step-4"]
    state = json.loads((bucket / "jobs/cut/checkpoints/step-4/state.json").read_text())
    assert state["workers"] == 2 and len(state["rank_rng"]) == 2
    assert state["rank_rng"][0] != state["rank_rng"][1]  # each rank's own dropout stream

    # A different world size is refused, naming the checkpoint's.
    other = _gang(tmp_path, "other", 1, job_id="cut", attempt=2, stop=None, **base)
    assert "thread count or number of GPUs" in other[0]["error"], other

    again = _gang(tmp_path, "again", 2, job_id="cut", attempt=2, stop=None, **base)
    assert [o["ok"] for o in again] == [True, True], again
    assert again[0]["metrics"]["resumed_from_step"] == STOP
    # Only rank 0 wrote the adapter, once per job; its bytes are the uninterrupted run's.
    assert sorted(p.name for p in (bucket / "adapters" / "gang").iterdir()) == ["calm", "cut"]
    a = (bucket / "adapters/gang/cut" / WEIGHTS).read_bytes()
    assert a == (bucket / "adapters/gang/calm" / WEIGHTS).read_bytes()
    assert again[0]["metrics"]["final_loss"] == calm[0]["metrics"]["final_loss"]
