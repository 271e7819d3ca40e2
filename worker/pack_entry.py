"""One attempt of a pack of jobs on one node: pull once, train together, upload each job's.

The pack counterpart of `entrypoint.run_job`: the base model is pulled (and loaded) once, each
job's dataset is pulled for it, `trainers.<kind>.pack.train_pack` trains them together, and as
each job ends its adapter gets its sidecar (which names the jobs it was packed with) and is
uploaded at once, while the others train on. A job's failure (bad data, a NaN loss) is its own
outcome; only a failure of the pack itself (the base model cannot load, SIGTERM) ends them all.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorajobs.jobspecs.failures import LoraJobsError
from lorajobs.storage.adapters import upload_adapter
from lorajobs.storage.checkpoints import CheckpointStore, discard_after_success
from lorajobs.storage.pull import pull_dataset, pull_model
from lorajobs.worker.context import WorkerContext
from lorajobs.worker.entrypoint import adapter_uri, check_device
from lorajobs.worker.sidecar import SIDECAR, write_metadata
from lorajobs.worker.trainers.pack import PackJob, PackOutcome

log = logging.getLogger("lorajobs.worker")

# job id -> its result dict (run_job's shape) or {"error": LoraJobsError} / {"cancelled": True}
Ended = Callable[[str, dict[str, Any]], None]

PACK_TRAINERS = {
    "text": "lorajobs.worker.trainers.text.pack",
    "image": "lorajobs.worker.trainers.image.pack",
}


def run_pack(
    specs: list[Any],
    ctxs: list[WorkerContext],
    *,
    cancelled: Callable[[str], bool] = lambda _: False,
    on_end: Ended | None = None,
) -> dict[str, dict[str, Any]]:
    """Train `specs` (one kind, one base model) as one pack; one result per job id.

    A job's result is `run_job`'s dict, or `{"error": err}` (a `LoraJobsError` of that job
    alone), or `{"cancelled": True}`. Each also carries `steps_done` (the job's share of the
    attempt's work). `on_end` is told as each job ends.
    """
    import importlib

    kind = specs[0].kind
    if kind not in PACK_TRAINERS:
        raise LoraJobsError(f"no pack trainer for kind {kind!r}")
    train_pack = importlib.import_module(PACK_TRAINERS[kind]).train_pack
    for spec, ctx in zip(specs, ctxs):
        check_device(spec, ctx)
        if ctx.checkpoints is None:
            ctx.checkpoints = CheckpointStore.for_job(ctx.output_uri, ctx.job_id)
    results: dict[str, dict[str, Any]] = {}
    model_dir = pull_model(specs[0].base_model, ctxs[0].cache_dir)
    jobs = []
    work_root = ctxs[0].cache_dir / "work"
    work_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pack-", dir=work_root) as tmp:
        for spec, ctx in zip(specs, ctxs):
            try:
                data_path = pull_dataset(spec.dataset, ctx.cache_dir)
            except LoraJobsError as err:  # one job's missing data fails that job only
                data_path = Path(tmp) / f"missing-{ctx.job_id}"
                results[ctx.job_id] = {"error": err, "steps_done": 0}
                continue
            out_dir = Path(tmp) / ctx.job_id / "adapter"
            out_dir.mkdir(parents=True)
            job_id = ctx.job_id
            jobs.append(
                PackJob(spec, data_path, out_dir, ctx, cancelled=lambda j=job_id: cancelled(j))
            )
        for job_id, res in results.items():
            if on_end is not None:
                on_end(job_id, res)

        def ended(job: PackJob, out: PackOutcome) -> None:
            res = _finish(job, out, model_dir)
            results[job.ctx.job_id] = res
            if on_end is not None:
                on_end(job.ctx.job_id, res)

        if jobs:
            train_pack(jobs, model_dir, on_outcome=ended)
    return results


def _finish(job: PackJob, out: PackOutcome, model_dir: Path) -> dict[str, Any]:
    """A job that left the pack: sidecar and upload when it succeeded; its result dict."""
    tr = job.spec.training
    # Rows the job put through the shared base: its share of the attempt's work (and cost).
    work = out.steps_done * tr.gradient_accumulation_steps * tr.batch_size
    base = {"steps_done": out.steps_done, "work": work, "packed_with": out.packed_with}
    if out.cancelled:
        return {"cancelled": True, **base}
    if out.error is not None or out.output is None:
        return {"error": out.error, **base}
    spec, ctx = job.spec, job.ctx
    ctx.extra["pack"] = {"packed_with": out.packed_with}
    t = time.monotonic()
    try:
        sidecar = write_metadata(
            spec,
            ctx,
            adapter_dir=job.out_dir,
            model_dir=model_dir,
            data_path=job.data_path,
            output=out.output,
            timings={"train": None, "export": None, "upload": None},
        )
        dest = adapter_uri(spec, ctx)
        upload_adapter(job.out_dir, dest, marker=SIDECAR)
    except LoraJobsError as err:
        return {"error": err, **base}
    log.info("adapter uploaded to %s", dest)
    try:
        removed = discard_after_success(ctx.output_uri, ctx.job_id, dest, adapter_marker=SIDECAR)
    except LoraJobsError as err:
        log.warning("job %s: checkpoints not removed: %s", ctx.job_id, err)
        removed = 0
    return {
        "adapter_uri": dest,
        "files": {rel: info["sha256"] for rel, info in sidecar["files"].items()},
        "metrics": out.output.metrics,
        "timings": {"upload": round(time.monotonic() - t, 3)},
        "checkpoints_removed": removed,
        **base,
    }
