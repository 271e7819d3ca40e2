"""Whether any node of this deployment could ever run a job that only a CUDA GPU can run (a
quantized base, bitsandbytes' 8-bit AdamW): refused at submit, in one line, when none could.

"No node could run it" is decided from what the deployment declares, without starting Ray:
with no `LORAJOBS_RAY_ADDRESS` the controller starts a local Ray on this machine and gives it
this machine's GPUs (`local_gpu_count`, as `RayBackend` does), and nothing else ever joins, so
a machine without an NVIDIA GPU can run no such job. A cluster may gain GPU nodes later (its
autoscaler, a `ray start` on another machine): there the job is queued, waits for one with the
scheduler's reason, and the worker refuses it if its node turns out to lack CUDA or
bitsandbytes. Other GPU jobs keep their old path (the controller fails a job no local node
can run), since `resources.gpus` alone may fall back to the CPU where a node allows it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from lorajobs.jobspecs.cuda import cuda_settings
from lorajobs.jobspecs.failures import SpecError


def local_gpu_count() -> int:
    """NVIDIA GPUs this machine shows its processes: the driver's list, narrowed by
    `CUDA_VISIBLE_DEVICES` when that is set (empty or -1: none). No torch import."""
    try:
        found = len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return found
    ids = [v for v in visible.split(",") if v.strip()]
    if ids and ids[0].strip() == "-1":
        return 0
    return min(found, len(ids))


def unrunnable(spec: Any, ray_address: str | None) -> str | None:
    """One line, naming the field, when `spec` needs CUDA and no node here could give it."""
    needs = cuda_settings(spec.training)
    if not needs or ray_address is not None or local_gpu_count() > 0:
        return None
    return (
        f"{needs[0]} needs a CUDA GPU, and no node here has one (jobs run on this machine, which "
        "has no NVIDIA GPU): submit to a cluster with GPU nodes (LORAJOBS_RAY_ADDRESS)"
    )


def refuse_unrunnable(specs: Iterable[tuple[str, Any]], ray_address: str | None) -> None:
    """SpecError for the first of `(source, spec)` that no node could run; before any is
    queued, so a batch is all or nothing."""
    for source, spec in specs:
        problem = unrunnable(spec, ray_address)
        if problem:
            raise SpecError(source, [problem])
