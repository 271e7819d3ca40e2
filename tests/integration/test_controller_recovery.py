"""The controller's decisions on a real database and a real (folder) bucket, with Ray replaced by
a scripted fake: takeover after a controller dies, no rerun of a finished job, retry budgets and
backoff, max_runtime, cancel, and two controllers that never dispatch the same job.

The real-Ray versions of these paths run on a simulated cluster in `test_cluster_*.py`."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from lorajobs.jobspecs import parse_spec
from lorajobs.orchestrator.controller import Controller
from lorajobs.orchestrator.db import ensure_schema, make_engine
from lorajobs.orchestrator.drain import Drain
from lorajobs.orchestrator.queue import JobRecord, Queue
from lorajobs.orchestrator.ray_backend import Attempt, ClusterView
from lorajobs.orchestrator.recovery import RetryPolicy
from lorajobs.orchestrator.scheduler import Policy
from lorajobs.orchestrator.settings import ControllerConfig
from lorajobs.orchestrator.states import JobStatus

Q, D, R = JobStatus.queued, JobStatus.dispatched, JobStatus.running
S, F, C = JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled
NODES = {
    "node-a": {"CPU": 8.0, "GPU": 1.0, "accelerator_type:A100": 1.0},
    "node-b": {"CPU": 8.0, "GPU": 1.0, "accelerator_type:A100": 1.0},
}


class FakeRay:
    """What the controller needs from `RayBackend`, scripted by the test."""

    local = False

    def __init__(
        self, driver: str = "session_t/01000000", nodes: dict[str, dict[str, float]] | None = None
    ) -> None:
        self.driver = driver
        self.nodes = nodes if nodes is not None else NODES
        self.alive: dict[str, bool] = {}
        self.launched: list[Attempt] = []
        self.results: dict[str, dict[str, Any]] = {}
        self.reports: dict[str, dict[str, Any]] = {}
        self.cancelled: list[str] = []
        self.requests: list[list[dict[str, float]]] = []
        self.drains: dict[str, Drain] = {}  # node id -> its drain
        self.drain_reads = 0  # how often the controller asked Ray which nodes drain
        self.stops: list[tuple[str, int, str]] = []  # (job id, attempt, why) asked to stop
        self._lock = threading.Lock()

    def driver_id(self) -> str:
        return self.driver

    def driver_alive(self, driver: str) -> bool | None:
        return self.alive.get(driver)

    def cluster(self) -> ClusterView:
        return ClusterView({k: dict(v) for k, v in self.nodes.items()}, None)

    def draining(self) -> dict[str, Drain]:
        self.drain_reads += 1
        return dict(self.drains)

    def request_stop(self, attempt: Attempt, why: str) -> None:
        self.stops.append((attempt.job_id, attempt.attempt, why))

    def launch(
        self,
        job_id: str,
        attempt: int,
        spec: dict[str, Any],
        output_uri: str,
        *,
        shape: Any,
        node_id: str | None,
        extra: dict[str, Any] | None = None,
    ) -> Attempt:
        a = Attempt(job_id, attempt, ref=f"{job_id}:{attempt}", started=0.0, node_id=node_id)
        with self._lock:
            self.launched.append(a)
        return a

    def progress(self) -> dict[str, dict[str, Any]]:
        out, self.reports = self.reports, {}
        return out

    def finished(self, attempts: list[Attempt]) -> list[Attempt]:
        return [a for a in attempts if a.job_id in self.results]

    def outcome(self, attempt: Attempt) -> dict[str, Any]:
        return self.results.pop(attempt.job_id)

    def cancel(self, attempt: Attempt, wait_s: float = 10.0) -> bool:
        self.cancelled.append(attempt.job_id)
        return True

    def request_resources(self, bundles: list[dict[str, float]]) -> None:
        self.requests.append(bundles)


def spec(name: str, **over: Any) -> Any:
    data: dict[str, Any] = {
        "kind": "text",
        "name": name,
        "base_model": "m",
        "dataset": "d",
        "training": {"steps": 10},
        "resources": {"gpus": 1, "cpus": 1},
    }
    data.update(over)
    return parse_spec(data)


@pytest.fixture
def queue(any_db_url: str) -> Any:
    engine = make_engine(any_db_url)
    ensure_schema(engine, auto=True)
    yield Queue(engine)
    engine.dispose()


@pytest.fixture
def bucket(tmp_path: Path) -> str:
    return f"file://{tmp_path / 'bucket'}"


CONFIG = ControllerConfig(
    lease_s=30,
    retry=RetryPolicy(infra_retries=2, backoff_s=0.0),
    policy=Policy(aging_s=0),
    prices={"A100": 3.6},
)


def controller(queue: Queue, backend: FakeRay, **over: Any) -> Controller:
    return Controller(queue, backend, replace(CONFIG, **over))  # type: ignore[arg-type]


def orphan(
    queue: Queue,
    job: JobRecord,
    *,
    driver: str = "session_t/07000000",
    expires_in_s: float = -1.0,
    running: bool = True,
) -> JobRecord:
    """A job left active by a controller that is gone (or not), as a crash leaves it."""
    until = datetime.now(timezone.utc) + timedelta(seconds=expires_in_s)
    queue.dispatch(
        job.id,
        lease_owner=f"dead-ctl {driver}",
        lease_expires_at=until,
        node_id="node-a",
        accelerator="A100",
    )
    if running:
        return queue.transition(job.id, expected=D, to=R, reason="training", node="host-a")
    return queue.get(job.id)


def complete_adapter(bucket: str, job: JobRecord) -> Path:
    folder = Path(bucket.removeprefix("file://")) / "adapters" / job.name / job.id
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    sidecar = {
        "job_id": job.id,
        "attempt": job.attempt,
        "node": "host-a",
        "metrics": {"final_loss": 0.5},
        "timings": {"train": 1.0},
        "files": {"adapter_model.safetensors": {"sha256": "ab" * 32, "size": 7}},
    }
    (folder / "lorajobs.json").write_text(json.dumps(sidecar))
    return folder


# ---- a controller that died ---------------------------------------------------------------


def test_a_finished_attempt_whose_controller_died_is_recorded_not_rerun(
    queue: Queue, bucket: str
) -> None:
    job = orphan(queue, queue.submit(spec("done"), output_uri=bucket)[0])
    complete_adapter(bucket, job)
    ray = FakeRay()
    controller(queue, ray).step()
    got = queue.get(job.id)
    assert got.status is S and got.attempt == 1 and ray.launched == []
    assert got.result["recovered_from_sidecar"] and got.result["metrics"] == {"final_loss": 0.5}
    assert got.result["files"] == {"adapter_model.safetensors": "ab" * 32}
    assert queue.events(job.id)[-1].reason == "adapter found complete in the bucket"


def test_checkpoints_a_finished_attempt_left_go_when_it_is_recorded(
    queue: Queue, bucket: str
) -> None:
    """A worker lost between its upload and its clean-up leaves checkpoints: the controller
    that records the adapter removes them; an unfinished job keeps its own for the retry."""
    from lorajobs.storage.checkpoints import Checkpoint, CheckpointStore
    from lorajobs.worker.safetensors_io import canonical_bytes

    done = orphan(queue, queue.submit(spec("done"), output_uri=bucket)[0])
    lost = orphan(queue, queue.submit(spec("lost"), output_uri=bucket)[0])
    for job in (done, lost):
        CheckpointStore.for_job(bucket, job.id).save(
            Checkpoint(5, canonical_bytes({}), {"step": 5}), keep=1
        )
    complete_adapter(bucket, done)
    controller(queue, FakeRay()).step()
    assert queue.get(done.id).status is S and queue.get(lost.id).attempt == 2
    assert CheckpointStore.for_job(bucket, done.id).steps() == []
    assert CheckpointStore.for_job(bucket, lost.id).steps() == [5]


def test_an_unfinished_attempt_is_requeued_without_charging_the_job_and_runs_again(
    queue: Queue, bucket: str
) -> None:
    job = orphan(queue, queue.submit(spec("lost"), output_uri=bucket)[0])
    ray = FakeRay()
    c = controller(queue, ray)
    c.step()
    got = queue.get(job.id)
    # Requeued and, in the same pass, dispatched again as attempt 2.
    assert got.status is D and got.attempt == 2 and got.lease_owner == c.lease
    assert got.infra_retries == 0  # losing the controller is not the job's fault
    assert [a.attempt for a in ray.launched] == [2]
    requeue = [e for e in queue.events(job.id) if e.to_status is Q][-1]
    assert requeue.reason.startswith("attempt 1 lost (infra): controller dead-ctl lost")
    assert requeue.data["attempt"] == 1 and requeue.data["cost_usd"] is not None


def test_a_live_lease_is_left_alone_and_a_dead_driver_is_taken_over_at_once(
    queue: Queue, bucket: str
) -> None:
    live = orphan(
        queue,
        queue.submit(spec("live"), output_uri=bucket)[0],
        expires_in_s=60,
        driver="session_t/08000000",
    )
    dead = orphan(
        queue,
        queue.submit(spec("dead"), output_uri=bucket)[0],
        expires_in_s=60,
        driver="session_t/09000000",
    )
    stuck = orphan(
        queue,
        queue.submit(spec("stuck"), output_uri=bucket)[0],
        expires_in_s=-5,
        driver="session_t/0a000000",
    )
    ray = FakeRay()
    ray.alive = {
        "session_t/08000000": True,
        "session_t/09000000": False,
        "session_t/0a000000": True,
    }
    controller(queue, ray, takeover_grace_s=60).step()
    assert queue.get(live.id).status is R
    assert queue.get(dead.id).attempt == 2  # its Ray driver is gone: no need to wait the lease
    assert queue.get(stuck.id).status is R  # expired, but its controller is still connected
    controller(queue, ray, takeover_grace_s=1).step()
    assert queue.get(stuck.id).attempt == 2  # ... until the grace runs out


def test_an_orphan_with_a_cancel_request_is_cancelled(queue: Queue, bucket: str) -> None:
    job = orphan(queue, queue.submit(spec("c"), output_uri=bucket)[0])
    queue.request_cancel(job.id)
    ray = FakeRay()
    controller(queue, ray).step()
    assert queue.get(job.id).status is C and ray.launched == []


# ---- attempts that end ------------------------------------------------------------------------


def _run_to_dispatch(queue: Queue, ray: FakeRay, c: Controller, job_id: str) -> None:
    c.step()
    assert queue.get(job_id).status is D


def test_node_loss_uses_the_infra_budget_with_backoff_then_fails(queue: Queue, bucket: str) -> None:
    job, _ = queue.submit(spec("flaky"), output_uri=bucket)
    ray = FakeRay()
    c = controller(queue, ray, retry=RetryPolicy(infra_retries=2, backoff_s=30.0))
    _run_to_dispatch(queue, ray, c, job.id)
    ray.results[job.id] = {
        "ok": False,
        "kind": "infra",
        "error": "NodeDiedError: gone",
        "node_lost": True,
    }
    c.step()
    got = queue.get(job.id)
    assert got.status is Q and got.attempt == 2 and got.infra_retries == 1
    assert got.failure_kind.value == "infra" and got.not_before is not None
    c.step()
    assert queue.get(job.id).status is Q  # backing off: not dispatched yet
    with queue.engine.begin() as conn:  # the backoff has passed
        conn.exec_driver_sql("UPDATE jobs SET not_before = NULL")
    _run_to_dispatch(queue, ray, c, job.id)
    # The lost node is not given new work for a while.
    assert ray.launched[-1].node_id != ray.launched[0].node_id
    for _ in range(2):
        ray.results[job.id] = {"ok": False, "kind": "infra", "error": "WorkerCrashedError: x"}
        c.step()
        with queue.engine.begin() as conn:
            conn.exec_driver_sql("UPDATE jobs SET not_before = NULL")
        c.step()
    got = queue.get(job.id)
    assert got.status is F and got.attempt == 3 and got.infra_retries == 2
    # A manual retry starts fresh budgets.
    again = queue.retry(job.id)
    assert again.status is Q and again.attempt == 4 and again.infra_retries == 0


def test_user_errors_are_not_retried_and_success_records_cost(queue: Queue, bucket: str) -> None:
    bad, _ = queue.submit(spec("bad"), output_uri=bucket)
    good, _ = queue.submit(spec("good"), output_uri=bucket)
    ray = FakeRay()
    c = controller(queue, ray)
    c.step()
    ray.reports[good.id] = {
        "attempt": 1,
        "step": 5,
        "total_steps": 10,
        "loss": 1.0,
        "it_per_s": 2.0,
        "node": "host-b",
    }
    c.step()
    assert queue.get(good.id).status is R and queue.get(good.id).step == 5
    ray.results[bad.id] = {"ok": False, "kind": "user", "error": "dataset is empty"}
    ray.results[good.id] = {
        "ok": True,
        "adapter_uri": "u",
        "files": {},
        "metrics": {},
        "node": "host-b",
    }
    c.step()
    assert queue.get(bad.id).status is F and queue.get(bad.id).failure_kind.value == "user"
    done = queue.get(good.id)
    assert done.status is S and done.cost_usd is not None and done.cost_usd >= 0
    assert done.result["cost_usd"] == done.cost_usd and done.accelerator == "A100"


def test_max_runtime_stops_the_attempt_as_a_user_error(queue: Queue, bucket: str) -> None:
    job, _ = queue.submit(spec("slow", max_runtime=60), output_uri=bucket)
    ray = FakeRay()
    c = controller(queue, ray)
    c.step()
    assert queue.get(job.id).status is D
    later = controller(queue, ray)
    later._clock = lambda: datetime.now(timezone.utc) + timedelta(seconds=61)  # type: ignore[method-assign]
    later.inflight = c.inflight
    later.lease = c.lease
    later.step()
    got = queue.get(job.id)
    assert got.status is F and got.failure_kind.value == "user"
    assert "max_runtime of 60 s" in got.failure_reason and ray.cancelled == [job.id]


def test_cancel_of_a_running_job_stops_it(queue: Queue, bucket: str) -> None:
    job, _ = queue.submit(spec("c"), output_uri=bucket)
    ray = FakeRay()
    c = controller(queue, ray)
    c.step()
    queue.request_cancel(job.id)
    c.step()
    assert queue.get(job.id).status is C and ray.cancelled == [job.id]


def test_autoscaler_request_follows_the_queue(queue: Queue, bucket: str) -> None:
    ray = FakeRay(nodes={})  # scaled to zero: nothing fits until nodes come
    c = controller(queue, ray)
    a, _ = queue.submit(
        spec("a", resources={"gpus": 1, "gpu_type": "A100", "cpus": 2}), output_uri=bucket
    )
    c.step()
    assert ray.requests == [[{"CPU": 2.0, "GPU": 1.0, "accelerator_type:A100": 0.001}]]
    queue.request_cancel(a.id)
    c.autoscaler._last_check = -1e18  # type: ignore[union-attr]
    c.step()
    assert ray.requests[-1] == []


# ---- two controllers ----------------------------------------------------------------------------


def test_two_controllers_never_dispatch_the_same_job(any_db_url: str, bucket: str) -> None:
    engines = [make_engine(any_db_url) for _ in range(2)]
    ensure_schema(engines[0], auto=True)
    queues = [Queue(e) for e in engines]
    for i in range(60):
        queues[0].submit(spec(f"j{i}", resources={"gpus": 0, "cpus": 1}), output_uri=bucket)
    small = {"n1": {"CPU": 4.0}, "n2": {"CPU": 4.0}}  # 8 at a time: many contested rounds
    rays = [FakeRay(driver=f"session_t/0{i + 1}000000", nodes=small) for i in range(2)]
    ctls = [controller(q, r) for q, r in zip(queues, rays)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run(ctl: Controller, ray: FakeRay) -> None:
        try:
            barrier.wait(timeout=30)
            for _ in range(60):
                ctl.step()
                time.sleep(0.005)  # let the other controller in: the test is about contention
                for a in list(ctl.inflight.values()):  # every attempt finishes at once
                    ray.results[a.job_id] = {
                        "ok": True,
                        "adapter_uri": "u",
                        "files": {},
                        "metrics": {},
                    }
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=run, args=(c, r)) for c, r in zip(ctls, rays)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert errors == []
    launched = [a.job_id for r in rays for a in r.launched]
    assert len(launched) == len(set(launched)) == 60
    assert all(r.launched for r in rays), "both controllers should have taken part"
    jobs = queues[0].list()
    assert Counter(j.status for j in jobs) == {S: 60}
    for j in jobs:
        assert [e.to_status for e in queues[0].events(j.id)].count(D) == 1
    for e in engines:
        e.dispose()


def test_an_unreachable_ray_gives_one_line_after_retries(tmp_path: Path) -> None:
    """The controller's first connection retries, then says what it could not reach, once."""
    import socket

    from tests.e2e.cli import CLI

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli = CLI(
        home=tmp_path / "home",
        env={
            "LORAJOBS_RAY_ADDRESS": f"ray://127.0.0.1:{port}",
            "LORAJOBS_RAY_CONNECT_TRIES": "2",
            "RAY_CLIENT_INITIAL_CONNECTION_TIMEOUT_S": "1",
            "RAY_CLIENT_MAX_CONNECTION_TIMEOUT_S": "1",
        },
    )
    result = cli("controller", "--once", timeout=120)
    assert result.code == 1, result.err
    assert "Traceback" not in result.err, result.err
    assert f"cannot connect to Ray at ray://127.0.0.1:{port} after 2 tries" in result.err
    assert "trying again" in result.err  # the first failure was retried
