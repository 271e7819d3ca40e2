"""The controller loop: dispatch what fits, record progress, finish, retry, cancel, reap.

One iteration (`step`) reads the queue, talks to Ray and writes back through `Queue.transition`
— the only writer of status. Several controllers may run at once: compare-and-set on every
status change and a lease per dispatched job keep them from stepping on each other, and a job
whose controller died (its lease expired) goes back to the queue.
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from jobspecs.errors import InvalidTransition
from orchestrator.dispatch import INFRA, USER, Attempt, RayBackend
from orchestrator.queue import JobRecord, Queue
from orchestrator.retry import RetryPolicy, decide
from orchestrator.states import JobStatus

log = logging.getLogger("lorajobs.controller")

ACTIVE = (JobStatus.dispatched, JobStatus.running)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _aware(t: datetime | None) -> datetime | None:
    # SQLite hands datetimes back naive; they were written as UTC.
    return t.replace(tzinfo=timezone.utc) if t is not None and t.tzinfo is None else t


def demand(job: JobRecord) -> dict[str, float]:
    """The Ray resources one attempt of `job` takes."""
    need = {"CPU": float(job.cpus), "GPU": float(job.gpus)}
    if job.gpu_type:
        need[f"accelerator_type:{job.gpu_type}"] = 0.001
    return {k: v for k, v in need.items() if v > 0}


def fits(need: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in need.items())


@dataclass
class ControllerConfig:
    poll_s: float = 0.5
    lease_s: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_claim: int = 256


class Controller:
    """Drives jobs from `queued` to a terminal state on a Ray backend."""

    def __init__(self, queue: Queue, backend: RayBackend, config: ControllerConfig | None = None):
        self.queue = queue
        self.backend = backend
        self.config = config or ControllerConfig()
        self.id = f"{socket.gethostname()}-{secrets.token_hex(4)}"
        self.inflight: dict[str, Attempt] = {}
        self._need: dict[str, dict[str, float]] = {}  # job id -> resources its attempt holds
        self._last_heartbeat = 0.0
        self._not_before: dict[str, float] = {}  # job id -> monotonic time of its next try

    # -- the loop ---------------------------------------------------------------------------

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Step until `until()` is true (forever when None)."""
        log.info("controller %s started", self.id)
        while True:
            self.step()
            if until is not None and until():
                return
            time.sleep(self.config.poll_s)

    def step(self) -> None:
        """One pass; each phase is safe to repeat and safe against another controller."""
        self._apply_progress()
        self._collect_finished()
        self._apply_cancels()
        self._reap_orphans()
        self._dispatch()
        self._heartbeat()

    # -- phases -----------------------------------------------------------------------------

    def _apply_progress(self) -> None:
        for job_id, p in self.backend.progress().items():
            attempt = self.inflight.get(job_id)
            if attempt is None or attempt.attempt != p.get("attempt"):
                continue  # a stale report from an attempt we no longer own
            job = self.queue.get(job_id)
            if job.status == JobStatus.dispatched:
                self._try(job_id, JobStatus.dispatched, JobStatus.running,
                          f"training on {p.get('node') or 'a worker'}", node=p.get("node"))
            self.queue.record_progress(
                job_id,
                step=int(p.get("step", 0)),
                total_steps=int(p.get("total_steps", 0)),
                loss=p.get("loss"),
                it_per_s=p.get("it_per_s"),
                node=p.get("node"),
            )

    def _collect_finished(self) -> None:
        for attempt in self.backend.finished(list(self.inflight.values())):
            del self.inflight[attempt.job_id]
            out = self.backend.outcome(attempt)
            job = self.queue.get(attempt.job_id)
            if out.get("ok"):
                self._try(job.id, ACTIVE, JobStatus.succeeded,
                          f"adapter uploaded to {out.get('adapter_uri')}",
                          result=out, node=out.get("node"),
                          step=job.total_steps or job.step)
            else:
                self._fail_or_retry(job, out.get("kind", "internal"), out.get("error", "failed"))

    def _fail_or_retry(self, job: JobRecord, kind: str, error: str) -> None:
        retries = job.attempt - 1
        decision = decide(self.config.retry, kind, retries)
        if decision.retry:
            self._not_before[job.id] = time.monotonic() + decision.delay_s
            self._try(job.id, ACTIVE, JobStatus.queued,
                      f"attempt {job.attempt} lost ({kind}): {error}; retrying",
                      attempt=job.attempt + 1, failure_kind=kind, failure_reason=error,
                      lease_owner=None, lease_expires_at=None)
        else:
            self._try(job.id, ACTIVE, JobStatus.failed, f"{kind} error: {error}",
                      failure_kind=kind, failure_reason=error)

    def _apply_cancels(self) -> None:
        for job in self.queue.list(statuses=ACTIVE):
            if not job.cancel_requested:
                continue
            attempt = self.inflight.pop(job.id, None)
            if attempt is None and not self._orphaned(job) and job.lease_owner != self.id:
                continue  # another live controller owns it and will stop it
            if attempt is not None:
                self.backend.cancel(attempt)
            # The worker may have been killed mid-upload: make sure nothing of it stays visible.
            self._delete_partial_adapter(job)
            self._try(job.id, ACTIVE, JobStatus.cancelled, "cancelled by user")

    def _reap_orphans(self) -> None:
        for job in self.queue.list(statuses=ACTIVE):
            if job.id in self.inflight or not self._orphaned(job):
                continue
            log.warning("job %s: its controller's lease expired; requeueing", job.id)
            self._fail_or_retry(job, INFRA, f"controller {job.lease_owner} lost its lease")

    def _dispatch(self) -> None:
        totals = self.backend.totals()
        free = self._free(totals)
        now = time.monotonic()
        for job in self.queue.claim_queued(self.config.max_claim):
            if self._not_before.get(job.id, 0.0) > now:
                continue
            need = demand(job)
            if self.backend.local and not fits(need, totals):
                self._try(job.id, JobStatus.queued, JobStatus.failed,
                          _unschedulable(need, totals), failure_kind=USER,
                          failure_reason=_unschedulable(need, totals))
                continue
            if not fits(need, free):
                continue
            try:
                job = self.queue.transition(
                    job.id, expected=JobStatus.queued, to=JobStatus.dispatched,
                    reason=f"dispatched (attempt {job.attempt}) by {self.id}",
                    lease_owner=self.id, lease_expires_at=self._lease_until())
            except InvalidTransition:
                continue  # cancelled, or another controller took it first
            self.inflight[job.id] = self.backend.launch(
                job.id, job.attempt, job.spec, job.output_uri, cpus=job.cpus, gpus=job.gpus,
                gpu_type=job.gpu_type, memory_gb=job.spec.get("resources", {}).get("memory_gb"))
            self._need[job.id] = need
            for k, v in need.items():
                free[k] = free.get(k, 0.0) - v

    def _heartbeat(self) -> None:
        if time.monotonic() - self._last_heartbeat < self.config.lease_s / 3 or not self.inflight:
            return
        self.queue.renew_leases(self.id, list(self.inflight), self._lease_until())
        self._last_heartbeat = time.monotonic()

    # -- helpers ----------------------------------------------------------------------------

    def _free(self, totals: dict[str, float]) -> dict[str, float]:
        # Ray's availability lags a launch by a moment; what we launched ourselves we know now.
        ours: dict[str, float] = defaultdict(float)
        for job_id in self.inflight:
            for k, v in self._need.get(job_id, {}).items():
                ours[k] += v
        avail = self.backend.available()
        return {k: min(avail.get(k, 0.0), totals[k] - ours.get(k, 0.0)) for k in totals}

    def _lease_until(self) -> datetime:
        return _now() + timedelta(seconds=self.config.lease_s)

    def _orphaned(self, job: JobRecord) -> bool:
        expires = _aware(job.lease_expires_at)
        return job.lease_owner != self.id and (expires is None or expires < _now())

    def _delete_partial_adapter(self, job: JobRecord) -> None:
        from worker.storage import join_uri
        from worker.transfer import delete_adapter

        try:
            delete_adapter(join_uri(job.output_uri, "adapters", job.name, job.id))
        except Exception as err:  # noqa: BLE001 - cancel must still complete
            log.warning("job %s: could not remove a partial adapter: %s", job.id, err)

    def _try(self, job_id: str, expected: Any, to: JobStatus, reason: str, **fields: Any) -> bool:
        """A transition that may lose a race (cancel vs finish, two controllers): log, go on."""
        try:
            self.queue.transition(job_id, expected=expected, to=to, reason=reason, **fields)
            log.info("job %s -> %s: %s", job_id, to.value, reason)
            return True
        except InvalidTransition as err:
            log.info("job %s: %s", job_id, err)
            return False


def _unschedulable(need: dict[str, float], totals: dict[str, float]) -> str:
    missing = ", ".join(f"{k}={v:g} (cluster has {totals.get(k, 0):g})"
                        for k, v in need.items() if totals.get(k, 0.0) + 1e-9 < v)
    hint = " — set resources.gpus: 0 to train on the CPU" if "GPU" in missing else ""
    return f"no node can ever run this job: needs {missing}{hint}"
