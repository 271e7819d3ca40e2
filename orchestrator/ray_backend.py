"""The Ray backend of the controller: connect, read the cluster, launch one attempt as a task,
collect its outcome, and the progress board workers report to.

This is the only module that imports Ray, besides `drain` (which asks the GCS which nodes are
draining, and polls the board for stop requests inside a task). What runs on the worker node is
`lorajobs.orchestrator.attempt` (imported inside the task, `ray_tasks`), so the controller never loads
torch and the worker never sees the database.

Attempts are plain Ray tasks, pinned to the node the scheduler chose (node affinity, not soft).
A task is owned by the controller process that launched it, and Ray kills a dead owner's tasks
at once (fate-sharing; `tests/integration/test_cluster_faults.py` checks it on a cluster), so a
SIGKILLed controller leaves no attempt running behind it: its successor finds the jobs by their
expired leases and requeues them or, when the adapter is already complete in the bucket, marks
them succeeded without running them again (`lorajobs.orchestrator.reconcile`). Tasks rather than detached
actors, because task workers are reused (torch stays imported between jobs on a node): actors
would survive the controller but pay a fresh process per attempt. Through a Ray client
(`ray://`) the driver is a proxy on the head that keeps its tasks for Ray's reconnect grace
period (30 s) after the controller dies; the job table cannot be read from a client, so a
successor waits for the lease (`LORAJOBS_LEASE_S`, 30 s) — keep the lease at least that long.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import (
    GetTimeoutError,
    NodeDiedError,
    RayError,
    RayTaskError,
    TaskCancelledError,
    TaskUnschedulableError,
)
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lorajobs.jobspecs.failures import FailureKind, InvalidInput
from lorajobs.orchestrator.capability import local_gpu_count
from lorajobs.orchestrator.drain import Drain, read_drains
from lorajobs.orchestrator.gangs import is_gang
from lorajobs.orchestrator.ray_tasks import run_attempt, run_pack_attempt, signal_attempt
from lorajobs.orchestrator.scheduler import Shape
from lorajobs.orchestrator.settings import Settings
from lorajobs.storage.boundaries import ENV_KEYS

NAMESPACE = "lorajobs"
log = logging.getLogger("lorajobs.ray")
_HEAD_RESOURCE = "node:__internal_head__"


def ray_environment(tmp_root: str | None = None) -> None:
    """Keep a local Ray private and quiet: loopback only, no usage stats, short socket paths."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Unix socket paths are limited to ~107 bytes: keep Ray's session dir short.
    os.environ.setdefault("RAY_TMPDIR", tmp_root or tempfile.gettempdir())


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class ProgressBoard:
    """Latest progress per job, written by workers and drained by the controller that owns it;
    and the controller's stop requests, which workers poll (`StopPoll`). Restarted by Ray if its
    node dies (handles stay valid; unread reports are lost, stop requests are sent again)."""

    def __init__(self) -> None:
        self._latest: dict[str, dict[str, Any]] = {}
        self._stops: dict[str, tuple[int, str]] = {}  # job id -> (attempt, why)
        self._cancelled: set[str] = set()  # pack members their pack should drop

    def report(self, job_id: str, attempt: int, progress: dict[str, Any]) -> None:
        self._latest[job_id] = {**progress, "attempt": attempt}

    def drain(self) -> dict[str, dict[str, Any]]:
        out, self._latest = self._latest, {}
        return out

    def request_stop(self, job_id: str, attempt: int, why: str) -> None:
        self._stops[job_id] = (attempt, why)

    def stop_requested(self, job_id: str, attempt: int) -> str | None:
        asked, why = self._stops.get(job_id, (0, None))
        return why if asked == attempt else None

    def draining(self) -> dict[str, Drain]:
        # For a controller connected through the Ray client (ray://), which cannot ask the GCS.
        return read_drains()

    def cancel_member(self, job_id: str) -> None:
        """Ask the pack that trains `job_id` to drop it (the others train on)."""
        self._cancelled.add(job_id)

    def cancelled(self, job_ids: list[str]) -> list[str]:
        """Which of `job_ids` their pack should drop."""
        return [j for j in job_ids if j in self._cancelled]

    def request_resources(self, bundles: list[dict[str, float]]) -> None:
        # Called here, inside the cluster, because a controller connected through the Ray
        # client (ray://) has no GCS client and the SDK call fails there.
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)


@dataclass
class Attempt:
    """A launched Ray task for one attempt of one job."""

    job_id: str
    attempt: int
    ref: Any
    started: float
    node_id: str | None = None
    #: Its first progress report has been seen (the job moved to running).
    running: bool = False
    #: The jobs of its pack (this one included) when it trains in one; () when alone.
    pack: tuple[str, ...] = ()
    #: A multi-node gang's nodes (its workers', `node_id` among them); () otherwise.
    nodes: tuple[str, ...] = ()

    def on(self) -> tuple[str, ...]:
        """Every node the attempt trains on: its task's, and a gang's workers'."""
        return tuple(dict.fromkeys(n for n in (self.node_id, *self.nodes) if n))


@dataclass
class ClusterView:
    """Live nodes: Ray's totals and availability per node."""

    totals: dict[str, dict[str, float]]
    available: dict[str, dict[str, float]] | None


def connect(
    address: str, options: dict[str, Any], *, tries: int | None = None, first_delay_s: float = 2.0
) -> None:
    """`ray.init(address)`, retried with backoff: Ray's client server is known to crash on
    start now and then (ray-project/ray#63202). Gives up with one `ClusterUnavailable` line
    naming the address. `LORAJOBS_RAY_CONNECT_TRIES` (default 5) sets the number of tries."""
    from lorajobs.jobspecs.failures import ClusterUnavailable

    tries = tries or max(1, int(os.environ.get("LORAJOBS_RAY_CONNECT_TRIES", "5")))
    delay = first_delay_s
    for n in range(1, tries + 1):
        try:
            ray.init(address=address, **options)
            return
        except Exception as err:  # noqa: BLE001 - Ray raises many types here; all mean "not yet"
            if ray.is_initialized():
                ray.shutdown()
            if n == tries:
                raise ClusterUnavailable(
                    f"cannot connect to Ray at {address} after {tries} tries: {_first_line(err)}"
                ) from None
            log.warning("Ray at %s: %s; trying again in %.0f s", address, _first_line(err), delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)


def is_this_machine(host: str) -> bool:
    """Whether `host` is one of this machine's own addresses (it can be bound here)."""
    if host.lower() in ("auto", "local", "localhost"):
        return True
    try:
        infos = socket.getaddrinfo(host.strip("[]"), None)
    except OSError:
        return False
    for family, _, _, _, addr in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((addr[0], 0))
            return True
        except OSError:
            continue
    return False


def refuse_folder_bucket_on_remote_cluster(settings: Settings, node_ips: list[str]) -> None:
    """A `file://` bucket is a folder on this machine: workers on other machines would write
    adapters into folders of their own that nobody reads. Refused at controller start, in one
    line, rather than found out when the first job's adapter is missing."""
    address = settings.ray_address
    if address is None or not settings.bucket.startswith("file://"):
        return
    rest = address.split("://", 1)[-1]
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    elsewhere = [h for h in [host, *node_ips] if not is_this_machine(h)]
    if elsewhere:
        raise InvalidInput(
            f"LORAJOBS_BUCKET={settings.bucket} is a folder on this machine, but the Ray "
            f"cluster at {address} runs jobs on other machines ({elsewhere[0]}): use an s3:// "
            "bucket every node can reach"
        )


class RayBackend:
    """A connection to Ray: the local in-process default, or a cluster at `ray_address`."""

    def __init__(self, settings: Settings) -> None:
        refuse_folder_bucket_on_remote_cluster(settings, [])  # before connecting: the address
        self.settings = settings
        self.local = settings.ray_address is None
        ray_environment()
        if not ray.is_initialized():
            common: dict[str, Any] = {
                "namespace": NAMESPACE,
                "log_to_driver": False,
                "configure_logging": False,
                "runtime_env": {"env_vars": _worker_env()},
            }
            if self.local:
                ray.init(
                    include_dashboard=False,
                    num_gpus=local_gpu_count(),  # the driver's list: no torch import
                    object_store_memory=128 * 1024**2,
                    **common,
                )
            else:
                connect(settings.ray_address, common)
        if not self.local:  # ... and the nodes the cluster has now
            ips = [n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")]
            refuse_folder_bucket_on_remote_cluster(settings, ips)
        self.board = ProgressBoard.options(**self._near_head()).remote()
        # Wait for it here, at start-up, rather than in the first pass with jobs waiting.
        ray.get(self.board.drain.remote(), timeout=120)

    @staticmethod
    def _near_head() -> dict[str, Any]:
        # Keep the board off GPU nodes that come and go: on the head, which lives as long as the
        # cluster. (Soft node affinity was seen to land it on a worker node.) Read from the
        # public node list, which a Ray client (ray://) has too: nothing that needs the board
        # (`cluster`, `draining`) may run before it exists.
        if any(_HEAD_RESOURCE in n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")):
            return {"resources": {_HEAD_RESOURCE: 0.001}}
        return {}

    # -- identity ---------------------------------------------------------------------------

    def driver_id(self) -> str:
        """This process's identity in Ray: `<session>/<job id>` (recorded with its leases)."""
        return f"{_session_name()}/{ray.get_runtime_context().get_job_id()}"

    def driver_alive(self, driver_id: str) -> bool | None:
        """Whether the Ray driver `driver_id` is still connected: True / False, or None when
        this Ray cannot tell (another Ray instance: a local Ray dies with its controller; a Ray
        client connection, which has no access to the job table)."""
        session, _, job = driver_id.partition("/")
        try:
            if session == "unknown" or session != _session_name():
                return None
            for entry in ray._private.state.state.job_table():
                if entry["JobID"] == job:
                    return not entry["IsDead"]
        except Exception:  # noqa: BLE001 - private API; without it, leases decide alone
            return None
        return False

    # -- the cluster ------------------------------------------------------------------------

    def cluster(self) -> ClusterView:
        """Ray's totals and availability per live node. Which nodes drain is read apart
        (`draining`), once per controller pass (`DrainWatch.current`)."""
        import ray._private.state as state

        try:
            totals = state.total_resources_per_node()
            available = state.available_resources_per_node()
            available = {n: r for n, r in available.items() if n in totals}
        except Exception:  # noqa: BLE001 - private API: fall back to the public node list
            totals = {n["NodeID"]: dict(n["Resources"]) for n in ray.nodes() if n["Alive"]}
            available = None
        return ClusterView(totals, available)

    def draining(self) -> dict[str, Drain]:
        """The nodes Ray is draining, by id (none when it cannot be read this pass)."""
        try:
            return read_drains()
        except Exception:  # noqa: BLE001 - no GCS here (a Ray client): the board can ask it
            pass
        try:
            return dict(ray.get(self.board.draining.remote(), timeout=10))
        except (RayError, GetTimeoutError) as err:
            log.warning("cannot read which nodes are draining: %s", _first_line(err))
            return {}

    def request_resources(self, bundles: list[dict[str, float]]) -> None:
        """Tell Ray's autoscaler the shapes to make room for (replaces the previous request)."""
        ray.get(self.board.request_resources.remote(bundles), timeout=30)

    # -- attempts ---------------------------------------------------------------------------

    def launch(
        self,
        job_id: str,
        attempt: int,
        spec: dict[str, Any],
        output_uri: str,
        *,
        shape: Shape,
        node_id: str | None,
        extra: dict[str, Any] | None = None,
    ) -> Attempt:
        # A gang's task only coordinates: its workers' placement group holds the resources.
        need = {} if is_gang(spec) else shape.ray_resources()
        options: dict[str, Any] = {
            "num_cpus": need.pop("CPU", 0.0),
            "num_gpus": need.pop("GPU", 0.0),
            "name": f"lorajobs:{job_id}:{attempt}",
        }
        if "memory" in need:
            options["memory"] = need.pop("memory")
        if need:
            options["resources"] = need
        if node_id is not None:
            # Where the scheduler placed it; if that node is gone, Ray says so at once
            # (TaskUnschedulableError) instead of running it somewhere unplanned.
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
        ref = run_attempt.options(**options).remote(
            spec, job_id, attempt, output_uri, self.board, extra or {}
        )
        gang = tuple(((extra or {}).get("placement") or {}).get("gang_nodes") or ())
        return Attempt(job_id, attempt, ref, time.monotonic(), node_id, nodes=gang)

    def launch_pack(
        self,
        members: list[dict[str, Any]],
        output_uri: str,
        *,
        shape: Shape,
        node_id: str | None,
    ) -> list[Attempt]:
        """One Ray task for a pack (`shape`: its first job's); one `Attempt` per member."""
        need = shape.ray_resources()
        options: dict[str, Any] = {
            "num_cpus": need.pop("CPU", 0.0),
            "num_gpus": need.pop("GPU", 0.0),
            "name": "lorajobs-pack:" + ",".join(m["job_id"] for m in members),
        }
        if "memory" in need:
            options["memory"] = need.pop("memory")
        if need:
            options["resources"] = need
        if node_id is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
        ref = run_pack_attempt.options(**options).remote(members, output_uri, self.board)
        ids = tuple(m["job_id"] for m in members)
        now = time.monotonic()
        return [Attempt(m["job_id"], m["attempt"], ref, now, node_id, pack=ids) for m in members]

    def cancel_member(self, attempt: Attempt) -> None:
        """Drop one job from its running pack; the pack's task goes on with the others."""
        ray.get(self.board.cancel_member.remote(attempt.job_id), timeout=30)

    def progress(self) -> dict[str, dict[str, Any]]:
        try:
            return ray.get(self.board.drain.remote(), timeout=10)
        except (RayError, GetTimeoutError):
            return {}  # the board is restarting: reports resume with the next ones

    def finished(self, attempts: list[Attempt]) -> list[Attempt]:
        if not attempts:
            return []
        refs = list({a.ref: a for a in attempts})  # the members of a pack share one task
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        done = set(ready)
        return [a for a in attempts if a.ref in done]

    def wait(self, attempts: list[Attempt], timeout: float) -> None:
        """Return when any of `attempts` ends, or after `timeout` seconds."""
        if not attempts:
            time.sleep(timeout)
            return
        ray.wait(list({a.ref: a for a in attempts}), num_returns=1, timeout=timeout)

    def outcome(self, attempt: Attempt) -> dict[str, Any]:
        """The task's result dict, or a failure dict built from Ray's error."""
        try:
            return ray.get(attempt.ref, timeout=5)
        except TaskCancelledError:
            return {
                "ok": False,
                "kind": FailureKind.infra,
                "error": "task cancelled",
                "cancelled": True,
            }
        except RayTaskError as err:  # the task raised outside our guard: a bug of ours
            return {"ok": False, "kind": FailureKind.internal, "error": str(err).splitlines()[-1]}
        except (NodeDiedError, TaskUnschedulableError) as err:
            return {
                "ok": False,
                "kind": FailureKind.infra,
                "error": _first_line(err),
                "node_lost": True,
            }
        except (RayError, GetTimeoutError) as err:
            # Worker crashed, out of memory, object lost: the attempt is lost, not the job.
            return {"ok": False, "kind": FailureKind.infra, "error": _first_line(err)}

    def request_stop(self, attempt: Attempt, why: str) -> None:
        """Ask a running attempt to checkpoint after its current step and stop as `Preempted`
        (`why` is its reason); it polls the board. Fire and forget: send it again to be sure."""
        self.board.request_stop.remote(attempt.job_id, attempt.attempt, why)

    def cancel(self, attempt: Attempt, wait_s: float = 10.0) -> bool:
        """Stop a running attempt and wait until its worker is gone (so it writes nothing and
        its resources are free). Returns whether it ended within `wait_s`."""
        ray.cancel(attempt.ref, force=True)
        ready, _ = ray.wait([attempt.ref], timeout=wait_s)
        return bool(ready)

    def preempt(self, attempt: Attempt, wait_s: float = 10.0) -> bool:
        """Send the attempt's worker SIGTERM, as a spot reclaim would: unlike `cancel` (which
        kills it), the worker checkpoints its step and ends as preempted. Returns whether the
        signal was delivered (False: it was not running, or its node did not answer)."""
        options: dict[str, Any] = {}
        if attempt.node_id is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                attempt.node_id, soft=False
            )
        try:
            ref = signal_attempt.options(**options).remote(attempt.job_id, attempt.attempt)
            return bool(ray.get(ref, timeout=wait_s))
        except (RayError, GetTimeoutError) as err:
            log.warning("job %s: could not signal its attempt: %s", attempt.job_id, err)
            return False

    def shutdown(self) -> None:
        if self.local and ray.is_initialized():
            ray.shutdown()


def _session_name() -> str:
    # Private, but stable for years; absent with a Ray client (`ray://`) connection.
    node = getattr(ray._private.worker.global_worker, "node", None)
    return str(getattr(node, "session_name", None) or "unknown")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else 'lost'}"


def _worker_env() -> dict[str, str]:
    """Non-secret settings the workers need. Credentials stay in the node's own environment
    (or instance role) and never travel through Ray."""
    # The cache is a node's own: forward its settings only when set explicitly, so a worker
    # image's default (e.g. /var/cache/lorajobs) is not overridden by the controller's home.
    # Gangs (orchestrator/gang.py) use Ray Train's V2 API (the default in Ray 2.60): keep it on.
    env = {"HF_HUB_DISABLE_TELEMETRY": "1", "RAY_TRAIN_V2_ENABLED": "1"}
    for key in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "LORAJOBS_S3_ADDRESSING",
        "LORAJOBS_HOME",
        "LORAJOBS_CACHE_DIR",
        "LORAJOBS_CACHE_MAX_GB",
        "LORAJOBS_PULL_CONCURRENCY",
        "LORAJOBS_S3_FAST_GET",
        "LORAJOBS_KEEP_CHECKPOINTS",
        "LORAJOBS_MLFLOW_URI",  # the tracking server; its credentials stay in the node's env
        "LORAJOBS_MLFLOW_EXPERIMENT",
        *ENV_KEYS,  # the deployment's boundary: workers check it again before a job runs
    ):
        if key in os.environ:
            env[key] = os.environ[key]
    return env
