"""A simulated multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`).

Fixtures:
- `ray_head` (session): a head node with no CPUs or GPUs, so no job ever lands on it, started
  once (~10 s) on 127.0.0.1 with its sockets under a short /tmp folder; shut down at the end.
- `sim_cluster` (function): that head plus the worker nodes a test adds with `add_gpu_node`
  (logical GPUs and an `accelerator_type:<TYPE>` resource; training itself runs on the CPU) and
  removes with `remove` (abruptly: a lost or preempted node), or drains with `drain` (a spot
  reclaim with notice, as Ray's autoscaler sends it). Whatever a test added is removed
  afterwards, and an in-process Ray connection is closed, so tests do not see each other.

Nodes are processes on this machine: keep to the head + 2-3 nodes (~0.5 GiB each, plus ~0.5 GiB
per worker that imports torch).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest


@dataclass
class SimCluster:
    cluster: Any  # ray.cluster_utils.Cluster
    nodes: list[Any] = field(default_factory=list)

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    def add_gpu_node(
        self,
        accelerator: str | None = "A100",
        *,
        gpus: float = 1,
        cpus: int = 1,
        wait: bool = True,
        usable: bool = True,
        env: dict[str, str | None] | None = None,
    ) -> Any:
        """A worker node with `gpus` logical GPUs of type `accelerator`; returns it (`.node_id`).
        `wait=False` returns as soon as its processes start (it joins a few seconds later).

        Its GPUs are logical: jobs train on the CPU, which the node allows (as
        LORAJOBS_ALLOW_CPU_FALLBACK=1 does on a real one) unless `usable=False`, a node whose
        GPU does not work. `env` changes the node's own environment (None: unset), which its
        worker processes inherit, e.g. to take the bucket credentials away from one node."""
        resources = {f"accelerator_type:{accelerator}": 1.0} if accelerator else {}
        changes: dict[str, str | None] = {
            "LORAJOBS_ALLOW_CPU_FALLBACK": "1" if usable else None,
            **(env or {}),
        }
        saved = {k: os.environ.get(k) for k in changes}
        try:
            _apply_env(changes)  # the node's processes are spawned now, with this environment
            node = self.cluster.add_node(
                num_cpus=cpus,
                num_gpus=gpus,
                resources=resources,
                object_store_memory=80 * 1024**2,
                wait=wait,
            )
        finally:
            _apply_env(saved)
        self.nodes.append(node)
        if wait:
            self.cluster.wait_for_nodes()
        return node

    def remove(self, node: Any) -> None:
        """Kill the node at once, as a preempted spot instance goes."""
        self.cluster.remove_node(node, allow_graceful=False)
        self.nodes.remove(node)

    def drain(
        self,
        node: Any,
        deadline_s: float,
        *,
        reason: str = "DRAIN_NODE_REASON_PREEMPTION",
        message: str = "spot instance reclaimed",
    ) -> float:
        """Tell Ray the node will go in `deadline_s` seconds, as its autoscaler does for a
        reclaimed spot node and `ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION
        --deadline-remaining-seconds N` does by hand (the same GCS `DrainNode` RPC). Ray kills
        nothing at the deadline; `remove` does. Returns the deadline (Unix seconds)."""
        import time

        import ray
        from ray.core.generated import autoscaler_pb2

        deadline = time.time() + deadline_s
        gcs = ray._raylet.GcsClient(address=self.address)
        accepted, why = gcs.drain_node(
            node.node_id,
            autoscaler_pb2.DrainNodeReason.Value(reason),
            message,
            int(deadline * 1000),
        )
        assert accepted, f"Ray refused to drain {node.node_id[:12]}: {why}"
        return deadline


def _apply_env(changes: dict[str, str | None]) -> None:
    for key, value in changes.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def ray_head() -> Iterator[Any]:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # Unix socket paths are limited to ~107 bytes: not pytest's deep tmp_path.
    tmp = tempfile.mkdtemp(prefix="ljc-", dir="/tmp")
    old_tmp = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "num_gpus": 0,
            "include_dashboard": False,
            "object_store_memory": 80 * 1024**2,
        },
    )
    try:
        yield cluster
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        if old_tmp is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old_tmp
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def sim_cluster(ray_head: Any) -> Iterator[SimCluster]:
    import ray

    if ray.is_initialized():  # an earlier test's in-process driver
        ray.shutdown()
    sim = SimCluster(ray_head)
    try:
        yield sim
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for node in list(sim.nodes):
            sim.remove(node)


# ---- helpers for tests that run a controller against the simulated cluster ----------------------


def text_job(
    name: str,
    model: Any,
    data: Any,
    *,
    steps: int = 40,
    gpus: float = 1,
    gpu_type: str | None = None,
    owner: str = "default",
    priority: int = 0,
    **training: Any,
) -> Any:
    """A tiny text job (the tiny Llama, a few steps) asking for logical GPUs."""
    from lorajobs.jobspecs import parse_spec

    return parse_spec(
        {
            "kind": "text",
            "name": name,
            "owner": owner,
            "priority": priority,
            "base_model": str(model),
            "dataset": str(data),
            "lora": {"rank": 4, "alpha": 8},
            "training": {
                "steps": steps,
                "batch_size": 2,
                "learning_rate": 1e-3,
                "seed": 0,
                "max_seq_length": 64,
                **training,
            },
            "resources": {"gpus": gpus, "gpu_type": gpu_type, "cpus": 1},
        }
    )


def reference_weights(spec: Any, tmp: Any, weights: str = "adapter_model.safetensors") -> str:
    """The sha256 of the adapter weights of an uninterrupted run of `spec`, in-process here."""
    from lorajobs.worker.context import WorkerContext
    from lorajobs.worker.entrypoint import run_job

    ctx = WorkerContext(
        job_id="reference",
        output_uri=f"file://{tmp / 'ref-bucket'}",
        cache_dir=tmp / "ref-cache",
        threads=spec.resources.cpus,
        cpu_fallback=True,  # the job asks for a logical GPU; the reference runs on this CPU
    )
    return str(run_job(spec, ctx)["files"][weights])


def start_controller(sim: SimCluster, home: Any, config: Any) -> tuple[Any, Any]:
    """(queue, controller) for a fresh SQLite home, connected to the simulated cluster."""
    from lorajobs.orchestrator.controller import Controller
    from lorajobs.orchestrator.db import ensure_schema, make_engine
    from lorajobs.orchestrator.queue import Queue
    from lorajobs.orchestrator.ray_backend import RayBackend
    from lorajobs.orchestrator.settings import Settings

    settings = Settings.from_env({"LORAJOBS_HOME": str(home), "LORAJOBS_RAY_ADDRESS": sim.address})
    engine = make_engine(settings)
    ensure_schema(engine)
    queue = Queue(engine)
    return queue, Controller(queue, RayBackend(settings), config)


def drive(
    controller: Any, until: Any, *, timeout: float, each: Any = None, poll_s: float = 0.2
) -> None:
    """Step `controller` until `until()`; `each()` runs after every step (observe, inject)."""
    import time

    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            jobs = controller.queue.list()
            states = ", ".join(f"{j.name}={j.status.value}/a{j.attempt}/s{j.step}" for j in jobs)
            raise AssertionError(f"timed out after {timeout:g} s: {states}")
        controller.step()
        if each is not None:
            each()
        time.sleep(poll_s)
