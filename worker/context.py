"""What the worker is handed for one attempt of one job, and what a trainer hands back.

Plain data and callables: the same `run_job` runs inside a Ray task (progress goes to the
controller through an actor) and in `lorajobs run` (progress goes to the terminal).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorajobs.storage.checkpoints import CheckpointStore
    from lorajobs.worker.board import Board

ProgressFn = Callable[[dict[str, Any]], None]


def _ignore(_: dict[str, Any]) -> None:
    return None


@dataclass
class WorkerContext:
    """Everything an attempt needs besides the spec. No DB handles, no Ray handles."""

    job_id: str
    # Bucket root URI; the adapter goes to <output_uri>/adapters/<name>/<job_id>/.
    output_uri: str
    # Node-local cache for pulled models and datasets (shared by jobs on the node).
    cache_dir: Path
    attempt: int = 1
    # Called with {"step", "total_steps", "loss", "it_per_s"} as training goes.
    report: ProgressFn = _ignore
    # torch intra-op threads; fixed per job so results do not depend on the node's core count.
    threads: int = 1
    # Where the node is, for metadata and `status` ("host" / accelerator name).
    node: str = ""
    # Free-form facts recorded into the sidecar (attempt history, submit time, ...).
    extra: dict[str, Any] = field(default_factory=dict)
    # Where this job's checkpoints live; None: no checkpoints (trainer unit tests).
    # `run_job` sets it to <output_uri>/jobs/<job_id>/checkpoints/.
    checkpoints: CheckpointStore | None = None
    # Bucket root whose `cache/latents/` shares image encodings between jobs on the same data;
    # None: node-local cache only. `run_job` sets it to output_uri.
    latent_cache_uri: str | None = None
    # TEST HOOK (env LORAJOBS_STOP_AFTER_STEP): after this step, checkpoint and raise
    # `Preempted`, as a preempted node would stop. Never set in production.
    stop_after_step: int | None = None
    # The platform's stop request: returns why this attempt must checkpoint and stop now (its
    # node is draining for a spot reclaim), else None. Polled after every step; None: never.
    stop_requested: Callable[[], str | None] | None = None
    # This attempt's TensorBoard events; None: none written (trainer unit tests).
    # `run_job` sets it to <output_uri>/jobs/<job_id>/tensorboard/attempt-<N>/.
    board: Board | None = None
    # A job that asked for GPUs may train on this machine's CPU (`lorajobs run`, or a node
    # with LORAJOBS_ALLOW_CPU_FALLBACK=1) instead of failing as the node's fault.
    cpu_fallback: bool = False
    # This process's place in a gang (a multi-GPU job: one worker per GPU, Ray Train + DDP);
    # rank 0 writes the checkpoints, the adapter and the sidecar.
    rank: int = 0
    world_size: int = 1


@dataclass
class TrainOutput:
    """What a trainer returns once it has written its adapter files into its out_dir."""

    # Files the trainer wrote, relative to out_dir (the adapter itself, not the sidecar).
    files: list[str]
    # Final figures: loss, steps, examples seen, tokens, seconds of training ...
    metrics: dict[str, Any]
    # Hyper-parameters as resolved (defaults filled in), for the sidecar.
    resolved: dict[str, Any] = field(default_factory=dict)
    # The files whose bytes are a pure function of (spec, data, base model, threads): what
    # `lorajobs reproduce` compares. Others (kohya file with its timestamps) are not.
    deterministic: list[str] = field(default_factory=list)
