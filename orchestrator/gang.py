"""One attempt of a gang job (several GPUs, `orchestrator/gangs.py`) on Ray Train.

`attempt.run` calls `run_gang` inside the attempt's Ray task (which holds no resources itself:
the workers' placement group holds them). It starts a `TorchTrainer` with one worker per GPU,
each bundle `{"GPU": 1, "CPU": cpus, ...}`, placed as one placement group: all bundles at once
or none (STRICT_PACK on one node, STRICT_SPREAD with one GPU per node, PACK otherwise), each worker
held by a label selector to the node the scheduler chose for it (`worker_nodes`). Each
worker runs `run_rank`: the same `run_job` as a one-GPU job, with its rank and world size
(`worker/trainers/distributed.py`); rank 0's progress comes back to this task through a relay
actor and goes on to the controller and the attempt log.

Failures: Ray Train is told to retry nothing (`max_failures=0`, no preemption retries), so a
lost worker or node stops the whole gang at once and `fit` raises; an error our worker raised
on purpose (bad data, preemption) is re-raised as itself, anything else (a dead actor, a lost
node) as `GangLost`, an infra failure. The controller then requeues the job and the next
attempt resumes the gang from its last checkpoint, at the same world size.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from lorajobs.jobspecs.failures import GangLost, LoraJobsError
from lorajobs.jobspecs.models import AnyJobSpec
from lorajobs.orchestrator import gangs
from lorajobs.orchestrator.cost import record_so_far
from lorajobs.orchestrator.scheduler import ACCELERATOR_PREFIX, ACCELERATOR_SLIVER, GIB

#: Which torch.distributed backend the gang uses; default NCCL, gloo where GPUs are logical
#: (the node trains on its CPU: LORAJOBS_ALLOW_CPU_FALLBACK=1), or as this setting says.
BACKEND_ENV = "LORAJOBS_GANG_BACKEND"
#: The label every Ray node carries with its own id (`ray.util.placement_group`'s key).
NODE_ID_LABEL = "ray.io/node-id"


def worker_resources(spec: AnyJobSpec) -> dict[str, float]:
    """One worker's bundle: a GPU, its CPUs (its thread count), its memory, its GPU type."""
    res = spec.resources
    need: dict[str, float] = {"CPU": float(res.cpus), "GPU": 1.0}
    if res.memory_gb:
        need["memory"] = float(int(res.memory_gb * GIB))
    if res.gpu_type:
        need[ACCELERATOR_PREFIX + res.gpu_type] = ACCELERATOR_SLIVER
    return need


def worker_nodes(nodes: list[str], workers: int) -> list[dict[str, str]] | None:
    """Each worker's node, as Ray label selectors: the nodes the scheduler chose for the gang,
    each hosting an equal share of the workers in order (None: Ray chooses, as for a one-node
    gang, which its task's node already pins)."""
    if not nodes or workers % len(nodes):
        return None
    share = workers // len(nodes)
    return [{NODE_ID_LABEL: node} for node in nodes for _ in range(share)]


def run_gang(
    spec: AnyJobSpec,
    raw_spec: dict[str, Any],
    job_id: str,
    attempt: int,
    output_uri: str,
    *,
    report: Callable[[dict[str, Any]], None],
    extra: dict[str, Any],
    log: Callable[[str], None],
    stop_requested: Callable[[], str | None] | None = None,
) -> dict[str, Any]:
    """Train `spec` on a gang of `resources.workers` workers; rank 0's result dict. Rank 0's
    progress reaches `report` (the attempt's: the controller and the attempt log) here.

    A stop notice — SIGTERM to this task (a priority preemption) or `stop_requested` (a drain)
    — goes to rank 0 through the relay; the ranks agree on it at their next step
    (`GangTrainLoop`), checkpoint together and end `Preempted`."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from lorajobs.worker.trainers.preemption import PreemptionNotice

    res = spec.resources
    strategy = gangs.placement_strategy(res.nodes, res.gpus)
    # The scheduler's nodes: a multi-node gang's, or the one this task was pinned to.
    chosen = (extra.get("placement") or {}).get("gang_nodes") or (
        [_this_node()] if res.nodes == 1 else []
    )
    scaling = ScalingConfig(
        num_workers=res.workers,
        use_gpu=True,
        resources_per_worker=worker_resources(spec),
        placement_strategy=strategy,
        label_selector=worker_nodes(chosen, res.workers),
    )
    backend = os.environ.get(BACKEND_ENV) or (
        "gloo" if os.environ.get("LORAJOBS_ALLOW_CPU_FALLBACK", "").strip() == "1" else "nccl"
    )
    log(f"gang of {res.workers} workers on {res.nodes} node(s) ({strategy}, {backend})")
    relay = _start_relay()
    config = {
        "spec": raw_spec,
        "job_id": job_id,
        "attempt": attempt,
        "output_uri": output_uri,
        "relay": relay,  # rank 0's progress, back to this task
        "extra": extra,
        "started": time.time(),  # for the cost rank 0 writes into the sidecar
    }
    # Ray Train's own files (no checkpoints of ours go there): removed with the attempt.
    with (
        PreemptionNotice(stop_requested) as notice,
        _relaying(relay, report, notice.reason),
        tempfile.TemporaryDirectory(prefix="lorajobs-train-") as storage,
    ):
        trainer = TorchTrainer(
            run_rank,
            train_loop_config=config,
            scaling_config=scaling,
            torch_config=TorchConfig(backend=backend),
            run_config=RunConfig(
                name=f"lorajobs-{job_id}-{attempt}",
                storage_path=storage,
                failure_config=FailureConfig(max_failures=0, max_preemption_failures=0),
            ),
        )
        try:
            result = trainer.fit()
        except Exception as err:  # noqa: BLE001 - Ray Train's errors: classified below
            raise _cause(err) from None
    if result.error is not None:
        raise _cause(result.error)
    payload = (result.metrics or {}).get("lorajobs_result")
    if not payload:
        raise GangLost(f"job {job_id}: the gang ended without rank 0's result")
    return dict(json.loads(payload))


def _this_node() -> str:
    import ray

    return str(ray.get_runtime_context().get_node_id())


def _start_relay() -> Any:
    """A small actor on this node that holds rank 0's progress until this task takes it (rank
    0 may run on another node, and the attempt's log and reporter live here)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    class Relay:
        def __init__(self) -> None:
            self.items: list[dict[str, Any]] = []

            self.why: str | None = None

        def put(self, item: dict[str, Any]) -> None:
            self.items = [*self.items[-99:], item]

        def stop(self, why: str) -> None:
            self.why = self.why or why

        def stopping(self) -> str | None:
            return self.why

        def take(self) -> list[dict[str, Any]]:
            out, self.items = self.items, []
            return out

    return Relay.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(_this_node(), soft=False)
    ).remote()


@contextmanager
def _relaying(
    relay: Any, report: Callable[[dict[str, Any]], None], notice: Callable[[], str | None]
) -> Iterator[None]:
    """Pass what rank 0 puts in `relay` to `report`, and a stop `notice` (once) to rank 0
    through it, about every second, until the block ends."""
    import ray

    stop = threading.Event()
    told: list[str] = []

    def pump() -> None:
        while True:
            last = stop.wait(1.0)
            why = notice()
            if why and not told:
                told.append(why)
                relay.stop.remote(why)  # rank 0 reads it within a second (`rank_stop`)
            try:
                items = ray.get(relay.take.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - progress is best effort: training goes on
                items = []
            for item in items:
                report(item)
            if last:
                return

    thread = threading.Thread(target=pump, name="lorajobs-gang-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=15)
        ray.kill(relay)


def _cause(err: BaseException) -> LoraJobsError:
    """What a failed fit means: an error our worker raised on purpose (first by rank), or the
    gang lost a member."""
    failures: dict[int, BaseException] = getattr(err, "worker_failures", None) or {}
    for _, failure in sorted(failures.items()):
        inner: BaseException | None = failure
        while inner is not None:
            if isinstance(inner, LoraJobsError):
                return inner
            inner = getattr(inner, "cause", None) or inner.__cause__
    text = str(err).strip().splitlines()
    why = next((line for line in text if line.strip()), type(err).__name__)
    ranks = ", ".join(str(r) for r in sorted(failures)) or "?"
    return GangLost(f"the gang lost a member (rank {ranks}): {why.strip()[:300]}")


def run_rank(config: dict[str, Any]) -> None:
    """One worker of the gang (Ray Train's `train_loop_per_worker`): `run_job` as rank r."""
    import ray.train

    from lorajobs.jobspecs import parse_spec
    from lorajobs.orchestrator.settings import Settings
    from lorajobs.worker.context import WorkerContext
    from lorajobs.worker.entrypoint import run_job

    tc = ray.train.get_context()
    rank, world = tc.get_world_rank(), tc.get_world_size()
    job_id, attempt, relay = config["job_id"], config["attempt"], config["relay"]
    spec = parse_spec(config["spec"], f"job {job_id}")
    node = socket.gethostname()

    def report(progress: dict[str, Any]) -> None:
        if progress.get("step") == progress.get("total_steps"):  # the sidecar comes next
            record_so_far(ctx.extra.get("cost"), time.time() - config["started"])
        relay.put.remote(progress)  # fire and forget

    ctx = WorkerContext(
        job_id=job_id,
        stop_requested=rank_stop(relay) if rank == 0 else None,
        output_uri=config["output_uri"],
        cache_dir=Settings.from_env().cache_dir,  # this node's own cache
        attempt=attempt,
        report=report if rank == 0 else (lambda _p: None),
        threads=spec.resources.cpus,
        node=node,
        extra=dict(config["extra"]),
        rank=rank,
        world_size=world,
    )
    out = run_job(spec, ctx)
    # Every rank reports once (Ray Train's report is a barrier); rank 0's metrics are kept.
    ray.train.report({"lorajobs_result": json.dumps(out) if rank == 0 else ""})


def rank_stop(relay: Any, every_s: float = 1.0) -> Callable[[], str | None]:
    """Rank 0's stop request: the relay's notice, asked at most every `every_s` (the loop
    calls this each step); the other ranks learn it from rank 0 at the same step."""
    import ray

    last = [0.0]
    why: list[str | None] = [None]

    def poll() -> str | None:
        now = time.monotonic()
        if why[0] is None and now - last[0] >= every_s:
            last[0] = now
            try:
                why[0] = ray.get(relay.stopping.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - asked again next time
                why[0] = None
        return why[0]

    return poll
