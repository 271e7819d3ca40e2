"""A gang without Ray: `world` spawned processes joined by gloo, each running the worker's
`run_job` as one rank (what Ray Train starts on a cluster). Each rank's outcome (its result,
or its error's class and line) comes back as a dict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _rank(rank: int, world: int, args: dict[str, Any]) -> None:
    """One rank (spawned): run_job as rank `rank`; its outcome in <out>/rank-<r>.json."""
    import torch.distributed as dist

    from lorajobs.jobspecs import parse_spec
    from lorajobs.jobspecs.failures import LoraJobsError
    from lorajobs.worker.context import WorkerContext
    from lorajobs.worker.entrypoint import run_job

    if world > 1:
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
            out: dict[str, Any] = {"ok": True, **run_job(parse_spec(args["spec"]), ctx)}
        except LoraJobsError as err:
            out = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        Path(args["out"], f"rank-{rank}.json").write_text(json.dumps(out))
    finally:
        if world > 1:
            dist.destroy_process_group()


def run_ranks(
    tmp: Path,
    name: str,
    world: int,
    spec: dict[str, Any],
    *,
    bucket: Path,
    job_id: str,
    attempt: int = 1,
    stop: int | None = None,
) -> list[dict[str, Any]]:
    """Run `spec` as a gang of `world` ranks to the end (`stop`: stop after that step, as a
    preemption would); each rank's outcome, by rank."""
    import torch.multiprocessing as mp

    out = tmp / name
    out.mkdir()
    args = {
        "spec": spec,
        "bucket": f"file://{bucket}",
        "cache": str(tmp / "cache"),
        "job_id": job_id,
        "attempt": attempt,
        "stop": stop,
        "init": f"file://{out / 'rendezvous'}",
        "out": str(out),
    }
    mp.spawn(_rank, args=(world, args), nprocs=world, join=True)
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(world)]
