"""One attempt of one job, start to finish: pull -> train -> metadata -> upload.

The same function runs inside a Ray task and in `lorajobs run`. It never touches the database
and never imports `orchestrator`: it returns a JSON-able result and raises on failure, and the
controller classifies the failure by exception type (`UserDataError` -> user, no retry).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from lorajobs.jobspecs.failures import NodeUnfit, Preempted, StorageError
from lorajobs.jobspecs.models import AnyJobSpec
from lorajobs.storage.adapters import upload_adapter
from lorajobs.storage.base import join_uri
from lorajobs.storage.checkpoints import CheckpointStore, discard_after_success
from lorajobs.storage.pull import pull_dataset, pull_model
from lorajobs.storage.staging import manifest_digest
from lorajobs.worker.board import Board
from lorajobs.worker.context import TrainOutput, WorkerContext
from lorajobs.worker.sidecar import SIDECAR, write_metadata
from lorajobs.worker.tracking import MlflowRun, flat_params
from lorajobs.worker.trainers import get_trainer

log = logging.getLogger("lorajobs.worker")


def adapter_uri(spec: AnyJobSpec, ctx: WorkerContext) -> str:
    """Where this job's adapter lives: `<output_uri>/adapters/<name>/<job_id>`."""
    return join_uri(ctx.output_uri, "adapters", spec.name, ctx.job_id)


# TEST HOOK, not a feature: `LORAJOBS_STOP_AFTER_STEP=N` makes an attempt checkpoint after step
# N and stop with `Preempted`, as a preempted node would; the resume tests use it to split one
# job across two processes.
STOP_AFTER_STEP_ENV = "LORAJOBS_STOP_AFTER_STEP"


CPU_FALLBACK_ENV = "LORAJOBS_ALLOW_CPU_FALLBACK"


def check_device(spec: AnyJobSpec, ctx: WorkerContext) -> None:
    """A job that asked for GPUs never trains on the CPU unannounced: without a usable CUDA
    device it fails as the node's fault (`NodeUnfit`, retried on another node), unless CPU
    fallback is allowed here, and then it says so in the log and the sidecar. A job whose
    settings need CUDA (`quantize_base`, `adamw8bit`) never falls back: `NeedsCuda`."""
    import torch

    # A quantized base or 8-bit AdamW runs on CUDA with bitsandbytes only: one line here, before
    # any fallback to the CPU (NeedsCuda, a user error), unless the node is at fault (below).
    from lorajobs.worker.trainers.quantize import refuse_here

    gpus = spec.resources.gpus
    if gpus <= 0 or torch.cuda.is_available():
        refuse_here(spec.training)
        return
    node = ctx.node or "this machine"
    if ctx.cpu_fallback or os.environ.get(CPU_FALLBACK_ENV, "").strip() == "1":
        refuse_here(spec.training)
        log.warning(
            "job %s asked for %g GPU(s) but %s has no usable CUDA device: training on "
            "the CPU (CPU fallback allowed)",
            ctx.job_id,
            gpus,
            node,
        )
        ctx.extra["cpu_fallback"] = {"gpus_requested": gpus, "device": "cpu"}
        return
    raise NodeUnfit(
        f"node {node}: the job asks for {gpus:g} GPU(s) but no usable CUDA device is here "
        f"(torch.cuda.is_available() is False; {CPU_FALLBACK_ENV}=1 on the node allows the CPU)"
    )


def run_job(spec: AnyJobSpec, ctx: WorkerContext) -> dict[str, Any]:
    """Run one attempt of `spec`, resuming from the job's latest checkpoint if it has one.

    Returns `{"adapter_uri", "files": {relpath: sha256}, "metrics", "timings",
    "checkpoints_removed"}`, plain JSON. Its TensorBoard events go to
    `<output_uri>/jobs/<job_id>/tensorboard/attempt-<N>/` (`lorajobs.worker.board`). Once the adapter is complete its checkpoints are
    deleted (`lorajobs.storage.checkpoints.discard_after_success`); a failed attempt keeps them.
    """
    timings: dict[str, float | None] = {}
    if ctx.checkpoints is None:
        ctx.checkpoints = CheckpointStore.for_job(ctx.output_uri, ctx.job_id)
    if ctx.latent_cache_uri is None:
        ctx.latent_cache_uri = ctx.output_uri
    if ctx.stop_after_step is None and os.environ.get(STOP_AFTER_STEP_ENV, "").strip():
        ctx.stop_after_step = int(os.environ[STOP_AFTER_STEP_ENV])

    check_device(spec, ctx)
    # Pull. The dataset first: it is usually the smaller of the two, and a missing one should
    # fail before a many-GB model download.
    # (The pull functions file entries under <cache_dir>/datasets and <cache_dir>/models.)
    t = time.monotonic()
    data_path = pull_dataset(spec.dataset, ctx.cache_dir)
    model_dir = pull_model(spec.base_model, ctx.cache_dir)
    timings["pull"] = _since(t)
    _stop_if_asked(ctx)

    work_root = ctx.cache_dir / "work"
    work_root.mkdir(parents=True, exist_ok=True)
    # A fresh folder per attempt, on the cache disk (large) rather than /tmp (often small).
    with tempfile.TemporaryDirectory(prefix=f"{ctx.job_id}-", dir=work_root) as tmp:
        out_dir = Path(tmp) / "adapter"
        out_dir.mkdir()

        t = time.monotonic()
        output, tracking = _train(spec, ctx, model_dir, data_path, out_dir, Path(tmp))
        timings["train"] = _since(t)
        if ctx.rank > 0:  # a gang's other workers: rank 0 writes the sidecar and uploads
            return {"rank": ctx.rank, "metrics": output.metrics, "timings": timings}

        t = time.monotonic()
        # The upload has not happened yet when the sidecar is written: it records None there
        # and the real figure travels in the result.
        sidecar = write_metadata(
            spec,
            ctx,
            adapter_dir=out_dir,
            model_dir=model_dir,
            data_path=data_path,
            output=output,
            timings={**timings, "export": None, "upload": None},
        )
        timings["export"] = _since(t)

        dest = adapter_uri(spec, ctx)
        t = time.monotonic()
        upload_adapter(out_dir, dest, marker=SIDECAR)
        timings["upload"] = _since(t)
        # Said here, the moment it is true: the attempt may still be killed during the clean-up
        # below, and its log must then show that the adapter is complete anyway.
        log.info("adapter uploaded to %s", dest)
        if tracking is not None:
            tracking.finish(ok=True, tags={"lorajobs.adapter_digest": _digest(sidecar)})

    try:
        removed = discard_after_success(ctx.output_uri, ctx.job_id, dest, adapter_marker=SIDECAR)
    except StorageError as err:  # the adapter is complete: a failed clean-up fails nothing
        log.warning("job %s: checkpoints not removed: %s", ctx.job_id, err)
        removed = 0
    return {
        "adapter_uri": dest,
        "files": {rel: info["sha256"] for rel, info in sidecar["files"].items()},
        "metrics": output.metrics,
        "timings": timings,
        "checkpoints_removed": removed,
    }


def _stop_if_asked(ctx: WorkerContext) -> None:
    """A stop request that came during the pull (the node is draining): go before training,
    with nothing new to checkpoint, rather than load the model to train one step."""
    why = ctx.stop_requested() if ctx.stop_requested is not None else None
    if why:
        raise Preempted(f"stopped before training: {why}")


def _train(
    spec: AnyJobSpec, ctx: WorkerContext, model_dir: Path, data_path: Path, out_dir: Path, tmp: Path
) -> tuple[TrainOutput, MlflowRun | None]:
    """Train into `out_dir`, with the attempt's TensorBoard events (and MLflow run, when the
    deployment names a server) written as it goes; returns the run, still open, for its end."""
    own_board = ctx.board is None and ctx.rank == 0  # a gang's events come from rank 0
    tracking = _mlflow_run(spec, ctx) if own_board else None
    if own_board:  # TensorBoard events: written here, uploaded with checkpoints and at the end
        ctx.board = Board.for_attempt(
            tmp / "tensorboard", ctx.output_uri, ctx.job_id, ctx.attempt, tracking
        )
    try:
        return get_trainer(spec.kind)(spec, model_dir, data_path, out_dir, ctx), tracking
    except BaseException:
        if tracking is not None:
            tracking.finish(ok=False)
        raise
    finally:
        if own_board and ctx.board is not None:
            ctx.board.close()
            ctx.board = None


def _mlflow_run(spec: AnyJobSpec, ctx: WorkerContext) -> MlflowRun | None:
    """The job's MLflow run when the deployment names a tracking server; else None."""
    from lorajobs.jobspecs import spec_to_dict

    job = {
        "lorajobs.job_id": ctx.job_id,
        "lorajobs.owner": spec.owner,
        "lorajobs.name": spec.name,
        "lorajobs.kind": spec.kind,
        "lorajobs.attempt": str(ctx.attempt),
    }
    return MlflowRun.from_env(job, flat_params(spec_to_dict(spec)))


def _digest(sidecar: dict[str, Any]) -> str:
    """The adapter's digest: over every file's path, size and sha256 (as staging names data)."""
    return manifest_digest(sidecar["files"])


def _since(t: float) -> float:
    return round(time.monotonic() - t, 3)
