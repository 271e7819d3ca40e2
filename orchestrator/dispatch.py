"""Ray side of the controller: start Ray, launch one attempt of a job as a task, collect it.

This is the only module that imports Ray. The task body imports the worker lazily, so the
controller process never loads torch; the worker never sees the database.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError, RayTaskError, TaskCancelledError

from orchestrator.settings import Settings

# Failure kinds as the worker reports them; `infra` is decided here, from Ray's own errors.
USER, INFRA, INTERNAL = "user", "infra", "internal"


def ray_environment(tmp_root: str | None = None) -> None:
    """Keep a local Ray private and quiet: loopback only, no usage stats, short socket paths."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Unix socket paths are limited to ~107 bytes: keep Ray's session dir short.
    os.environ.setdefault("RAY_TMPDIR", tmp_root or tempfile.gettempdir())


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Latest progress per job, written by workers and drained by the controller."""

    def __init__(self) -> None:
        self._latest: dict[str, dict[str, Any]] = {}

    def report(self, job_id: str, attempt: int, progress: dict[str, Any]) -> None:
        self._latest[job_id] = {**progress, "attempt": attempt}

    def drain(self) -> dict[str, dict[str, Any]]:
        out, self._latest = self._latest, {}
        return out


@ray.remote(max_retries=0)
def run_attempt(
    spec: dict[str, Any], job_id: str, attempt: int, output_uri: str, board: Any
) -> dict[str, Any]:
    """One attempt of one job on a worker node. Returns {"ok": bool, ...}; never raises for
    errors the worker understands, so the controller needs no exception pickling to classify."""
    import traceback

    from jobspecs import parse_spec
    from jobspecs.errors import LoraJobsError, StorageAuthError, UserDataError
    from worker.context import WorkerContext
    from worker.entrypoint import run_job

    node = socket.gethostname()
    cache = Path(os.environ.get("LORAJOBS_CACHE_DIR", Path.home() / ".lorajobs" / "cache"))
    parsed = parse_spec(spec, f"job {job_id}")
    last_sent = [0.0]

    def report(p: dict[str, Any]) -> None:
        # Fire and forget; the trainer already rate-limits, this guards against chatty ones.
        now = time.monotonic()
        if now - last_sent[0] >= 0.2 or p.get("step") == p.get("total_steps"):
            last_sent[0] = now
            board.report.remote(job_id, attempt, {**p, "node": node})

    ctx = WorkerContext(
        job_id=job_id,
        output_uri=output_uri,
        cache_dir=cache,
        attempt=attempt,
        report=report,
        threads=parsed.resources.cpus,
        node=node,
    )
    try:
        return {"ok": True, "node": node, **run_job(parsed, ctx)}
    except (UserDataError, StorageAuthError) as err:
        return {"ok": False, "kind": USER, "error": str(err), "node": node}
    except LoraJobsError as err:
        return {"ok": False, "kind": INTERNAL, "error": str(err), "node": node}
    except Exception as err:  # noqa: BLE001 - report, don't crash the task: we classify here
        traceback.print_exc()
        return {"ok": False, "kind": INTERNAL, "error": f"{type(err).__name__}: {err}", "node": node}


@dataclass
class Attempt:
    """A launched Ray task for one attempt of one job."""

    job_id: str
    attempt: int
    ref: Any
    started: float


class RayBackend:
    """A connection to Ray: the local in-process default, or a cluster at `ray_address`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.local = settings.ray_address is None
        ray_environment()
        if not ray.is_initialized():
            if self.local:
                ray.init(
                    include_dashboard=False,
                    num_gpus=_local_gpu_count(),
                    object_store_memory=128 * 1024**2,
                    log_to_driver=False,
                    configure_logging=False,
                    runtime_env={"env_vars": _worker_env(settings)},
                )
            else:
                ray.init(
                    address=settings.ray_address,
                    log_to_driver=False,
                    configure_logging=False,
                    runtime_env={"env_vars": _worker_env(settings)},
                )
        self.board = ProgressBoard.remote()

    def totals(self) -> dict[str, float]:
        return dict(ray.cluster_resources())

    def available(self) -> dict[str, float]:
        return dict(ray.available_resources())

    def launch(self, job_id: str, attempt: int, spec: dict[str, Any], output_uri: str,
               *, cpus: int, gpus: float, gpu_type: str | None,
               memory_gb: float | None) -> Attempt:
        options: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus, "name": f"lorajobs:{job_id}"}
        if gpu_type:
            # Ray labels GPU nodes with `accelerator_type:<TYPE>`; asking for a sliver of it
            # pins the task to such a node without limiting how many share it.
            options["resources"] = {f"accelerator_type:{gpu_type}": 0.001}
        if memory_gb:
            options["memory"] = int(memory_gb * 1024**3)
        ref = run_attempt.options(**options).remote(spec, job_id, attempt, output_uri, self.board)
        return Attempt(job_id, attempt, ref, time.monotonic())

    def progress(self) -> dict[str, dict[str, Any]]:
        return ray.get(self.board.drain.remote())

    def finished(self, attempts: list[Attempt]) -> list[Attempt]:
        if not attempts:
            return []
        by_ref = {a.ref: a for a in attempts}
        ready, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=0)
        return [by_ref[r] for r in ready]

    def outcome(self, attempt: Attempt) -> dict[str, Any]:
        """The task's result dict, or a failure dict built from Ray's error."""
        try:
            return ray.get(attempt.ref, timeout=5)
        except TaskCancelledError:
            return {"ok": False, "kind": INFRA, "error": "task cancelled", "cancelled": True}
        except RayTaskError as err:  # the task raised outside our guard: a bug of ours
            return {"ok": False, "kind": INTERNAL, "error": str(err).splitlines()[-1]}
        except (RayError, GetTimeoutError) as err:
            # Worker crashed, node died or was preempted, object lost: the attempt is lost, not
            # the job. Retried with resume.
            return {"ok": False, "kind": INFRA, "error": f"{type(err).__name__}: "
                    f"{str(err).splitlines()[0] if str(err) else 'lost'}"}

    def cancel(self, attempt: Attempt, wait_s: float = 10.0) -> None:
        """Stop a running attempt and wait until its worker is gone (so it writes nothing)."""
        ray.cancel(attempt.ref, force=True)
        ray.wait([attempt.ref], timeout=wait_s)

    def shutdown(self) -> None:
        if self.local and ray.is_initialized():
            ray.shutdown()


def _local_gpu_count() -> int:
    # Avoid importing torch in the controller: ask the driver files instead.
    try:
        return len([d for d in os.listdir("/proc/driver/nvidia/gpus")])
    except OSError:
        return 0


def _worker_env(settings: Settings) -> dict[str, str]:
    """Non-secret settings the workers need. Credentials stay in the node's own environment
    (or instance role) and never travel through Ray."""
    env = {"LORAJOBS_CACHE_DIR": str(settings.cache_dir), "HF_HUB_DISABLE_TELEMETRY": "1"}
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "LORAJOBS_S3_ADDRESSING"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env
