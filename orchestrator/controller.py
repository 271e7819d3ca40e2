"""The controller loop: progress, finish, cancel, reconcile, dispatch what fits, autoscale.

One pass (`step`) reads the database and Ray and writes back through `Queue.transition` / the
scheduling round — the only writers of status. The controller keeps nothing in memory that
matters: what it launched is in the database with its lease, and a controller started after a
crash (or next to another one) finds every job there (`lorajobs.orchestrator.reconcile`). Several
controllers may run at once: scheduling rounds are serialised, every status change is a
compare-and-set, and each job is leased to the controller that launched it.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from lorajobs.jobspecs.failures import FailureKind, InvalidTransition
from lorajobs.orchestrator import fairshare, pack_runs, packing, preempting, reconcile, waiting
from lorajobs.orchestrator.autoscale import Autoscaler
from lorajobs.orchestrator.cost import attempt_cost, hourly_rate
from lorajobs.orchestrator.drain import DrainWatch
from lorajobs.orchestrator.queue import JobRecord, Queue
from lorajobs.orchestrator.ray_backend import Attempt, RayBackend
from lorajobs.orchestrator.records import aware, launch_extra
from lorajobs.orchestrator.recovery import RETRY_COLUMN, Action, Loss, decide
from lorajobs.orchestrator.scheduler import Candidate, Hold, Round, Shape, node_views
from lorajobs.orchestrator.settings import ControllerConfig
from lorajobs.orchestrator.states import JobStatus

log = logging.getLogger("lorajobs.controller")

ACTIVE = (JobStatus.dispatched, JobStatus.running)
#: A node whose attempt was lost is not given new work for this long (Ray may list it a while).
SUSPECT_NODE_S = 60.0
#: For this long after one of our attempts ended on a node, its free capacity is taken from the
#: database (exact at once) rather than from Ray (which lags).
FRESH_S = 3.0


class Controller:
    """Drives jobs from `queued` to a terminal state on a Ray backend."""

    def __init__(
        self,
        queue: Queue,
        backend: RayBackend,
        config: ControllerConfig | None = None,
        *,
        clock: Callable[[], datetime] | None = None,
    ):
        self.queue = queue
        self.backend = backend
        self.config = config or ControllerConfig()
        # Leases and backoff are compared with times other controllers wrote: one clock for
        # all of them, the database's (the queue's), unless a test injects one.
        self._clock = clock or queue.clock
        self.id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        # The lease names this controller's Ray driver too, so a successor can tell a dead
        # controller (its tasks died with it) from a slow one.
        self.lease = reconcile.lease_owner(self.id, backend.driver_id())
        self.inflight: dict[str, Attempt] = {}
        self._suspect: dict[str, float] = {}  # node id -> monotonic time it is trusted again
        self._freed: dict[str, float] = {}  # node id -> monotonic time an attempt there ended
        self._last_heartbeat = 0.0
        self._waiting: waiting.WaitSummary | None = None  # the summary last published
        self.signalled: set[tuple[str, int]] = set()  # (job, attempt) sent a preemption notice
        self._pack_keys = packing.Keys()
        self._shares: dict[str, float] = {}  # job id -> its part of its pack attempt's cost
        enabled = self.config.autoscale == "auto" and not backend.local
        self.autoscaler = Autoscaler(backend) if enabled else None
        self.drains = DrainWatch(backend)  # attempts on nodes being reclaimed: checkpoint, go

    # -- the loop ---------------------------------------------------------------------------

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Step until `until()` is true (forever when None). A failing pass (database or Ray
        briefly unreachable) is logged and retried; nothing is lost, it is all in the database."""
        log.info("controller %s started", self.lease)
        while True:
            try:
                self.step()
            except Exception:  # noqa: BLE001 - keep serving; the next pass starts from the DB
                log.exception("controller pass failed; retrying")
                time.sleep(min(5.0, self.config.poll_s * 4))
            if until is not None and until():
                return
            # Sleep until the next pass, or less if an attempt ends: a finished job is recorded
            # (and its GPU given out again) at once, not up to a poll later.
            self.backend.wait(list(self.inflight.values()), self.config.poll_s)

    def step(self) -> None:
        """One pass; each phase is safe to repeat and safe against another controller."""
        self.drains.new_pass()  # the draining nodes are read once per pass, when first needed
        self._apply_progress()
        self._collect_finished()
        self.drains.sweep(self.inflight)
        active = self.queue.list(statuses=ACTIVE)
        self._heartbeat(active)
        settled = self._apply_cancels(active) | self._enforce_max_runtime(active)
        preempting.signal(self, [j for j in active if j.id not in settled])
        # Attempts ended just above are no longer active: the snapshot must not make them look
        # like jobs whose controller is gone (a cancel once logged a takeover of itself).
        self._reconcile([j for j in active if j.id not in settled])
        self._dispatch()
        self._autoscale()

    # -- phases -----------------------------------------------------------------------------

    def _apply_progress(self) -> None:
        for job_id, p in self.backend.progress().items():
            attempt = self.inflight.get(job_id)
            if attempt is None or attempt.attempt != p.get("attempt"):
                continue  # a stale report from an attempt we no longer own
            if not attempt.running:
                attempt.running = True
                self._try(
                    job_id,
                    JobStatus.dispatched,
                    JobStatus.running,
                    f"training on {p.get('node') or 'a worker'}",
                    node=p.get("node"),
                )
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
            self._forget(attempt.job_id)
            whole = self.backend.outcome(attempt)
            out = packing.member_outcome(whole, attempt.job_id)
            self._shares[attempt.job_id] = packing.cost_share(whole, attempt.job_id)
            job = self.queue.get(attempt.job_id)
            if job.status not in ACTIVE or job.lease_owner != self.lease:
                self._shares.pop(job.id, None)
                continue  # settled meanwhile (cancelled, or taken over): not ours to record
            if out.get("ok"):
                self._succeed(job, out, f"adapter uploaded to {out.get('adapter_uri')}")
                continue
            if out.get("node_lost") and attempt.node_id:
                self._suspect[attempt.node_id] = time.monotonic() + SUSPECT_NODE_S
            if out.get("node_fault") and attempt.node_id:
                # The node itself cannot run jobs (no usable GPU, no bucket credentials): keep
                # jobs off it for a while, so the retry lands elsewhere.
                log.warning(
                    "node %s: %s; no jobs go there for %.0f s",
                    out.get("node"),
                    out.get("error"),
                    self.config.node_fault_s,
                )
                self._suspect[attempt.node_id] = time.monotonic() + self.config.node_fault_s
            kind = FailureKind(out.get("kind", FailureKind.internal))
            if not preempting.settle(self, attempt, job, out, kind):  # preempted: uncharged
                self._lost(job, kind, out.get("error", "failed"))

    def _heartbeat(self, active: list[JobRecord]) -> None:
        mine = {j.id for j in active if j.lease_owner == self.lease}
        for job_id in [j for j in self.inflight if j not in mine]:
            # Another controller took the job over (we were too slow to renew): stop ours.
            log.warning("job %s is no longer leased to us; stopping our attempt", job_id)
            self.backend.cancel(self._forget(job_id), wait_s=0)
        if not self.inflight or time.monotonic() - self._last_heartbeat < self.config.lease_s / 3:
            return
        self.queue.renew_leases(self.lease, list(self.inflight), self._lease_until())
        self._last_heartbeat = time.monotonic()

    def _apply_cancels(self, active: list[JobRecord]) -> set[str]:
        """Stop the attempts of jobs whose cancel was requested; returns their ids."""
        settled = set()
        for job in active:
            if job.cancel_requested and job.id in self.inflight:
                pack_runs.stop(self, job.id)
                # The worker may have been killed mid-upload: nothing of it may stay visible.
                reconcile.delete_partial_adapter(job)
                self._end(job, JobStatus.cancelled, "cancelled by user")
                settled.add(job.id)
        return settled

    def _enforce_max_runtime(self, active: list[JobRecord]) -> set[str]:
        """Stop the attempts that ran past their job's `max_runtime`; returns their ids."""
        now, settled = self._clock(), set()
        for job in active:
            started = aware(job.dispatched_at)
            if job.id not in self.inflight or not job.max_runtime_s or started is None:
                continue
            if now - started > timedelta(seconds=job.max_runtime_s):
                pack_runs.stop(self, job.id)
                reconcile.delete_partial_adapter(job)
                error = f"exceeded max_runtime of {job.max_runtime_s:g} s"
                self._end(
                    job,
                    JobStatus.failed,
                    f"user error: {error}",
                    failure_kind=FailureKind.user,
                    failure_reason=error,
                )
                settled.add(job.id)
        return settled

    def _reconcile(self, active: list[JobRecord]) -> None:
        now = self._clock()
        alive: dict[str, bool | None] = {}

        def driver_alive(driver: str) -> bool | None:  # one question to Ray per driver and pass
            if driver not in alive:
                alive[driver] = self.backend.driver_alive(driver)
            return alive[driver]

        for job in active:
            if job.id in self.inflight:
                continue
            if job.lease_owner != self.lease:
                v = reconcile.verdict(
                    job, now=now, grace_s=self.config.takeover_grace_s, driver_alive=driver_alive
                )
                if v != reconcile.TAKE:
                    continue
            owner = job.lease_owner or "none"
            log.warning("job %s: its controller (%s) is gone; taking it over", job.id, owner)
            guard = {"lease_owner_was": job.lease_owner}
            if job.cancel_requested:
                reconcile.delete_partial_adapter(job)
                self._end(
                    job, JobStatus.cancelled, "cancelled by user (after controller loss)", **guard
                )
            else:
                self._lost(
                    job,
                    FailureKind.infra,
                    f"controller {owner.split(' ')[0]} lost",
                    charge=False,
                    **guard,
                )

    def _dispatch(self) -> None:
        if not self.queue.scheduling.has_queued():
            return
        view = self.backend.cluster()
        now_mono = time.monotonic()
        skip = set(self.drains.current()) | {n for n, t in self._suspect.items() if t > now_mono}
        available = view.available
        if available is not None:
            # Ray's view of a node lags an attempt's end by up to a second; the database knows
            # at once. Where one of ours just ended, trust the database alone for a moment.
            fresh = {n for n, t in self._freed.items() if now_mono - t < FRESH_S}
            available = {
                n: view.totals[n] if n in fresh else a
                for n, a in available.items()
                if n in view.totals
            }
        rounds: list[Round] = []
        with self.queue.engine.connect() as conn:
            ledger = fairshare.load(conn)
        cfg = self.config

        def estimate(job: Candidate) -> float | None:  # only asked for backfill candidates
            return fairshare.estimate_s(ledger, self.queue.get(job.id).spec, job.gpus, job.gpu_type)

        def start(holds: list[Hold]) -> Round:
            nodes, now = node_views(view.totals, holds, available, exclude=skip), self._clock()
            fair = fairshare.factors(ledger, holds, cfg.shares, now, cfg.halflife_s)
            rounds.append(
                Round(
                    nodes, holds, cfg.policy, now, fair=fair, shares=cfg.shares, estimate=estimate
                )
            )
            return rounds[-1]

        claimed = self.queue.scheduling.schedule(
            start,
            per_class=self.config.per_class,
            aging_s=self.config.policy.aging_s,
            lease_owner=self.lease,
            lease_expires_at=self._lease_until(),
        )
        packs = packing.fill(
            self.queue.scheduling,
            claimed if self.config.packing == "auto" else [],
            self._pack_keys,
            now=self._clock(),
            lease_owner=self.lease,
            lease_expires_at=self._lease_until(),
        )
        for pack in packs or [packing.Pack(job, []) for job in claimed]:
            if pack.members:
                pack_runs.launch(self, pack)
            else:
                self._launch(pack.leader)
        if rounds:
            preempting.record(self.queue, rounds[0].preempt.decisions, rounds[0].now)
            self._publish_waiting(rounds[0])
        if self.backend.local and rounds and not skip:
            # One machine, no autoscaler: a job no node can ever run would wait forever.
            for job_id in rounds[0].plan.never_fits:
                reason = waiting.unschedulable(self.queue.get(job_id), rounds[0].nodes)
                self._try(
                    job_id,
                    JobStatus.queued,
                    JobStatus.failed,
                    reason,
                    failure_kind=FailureKind.user,
                    failure_reason=reason,
                )

    def _publish_waiting(self, rnd: Round) -> None:
        """Tell `status` why queued jobs wait: when the round's reasons changed, and every
        `waiting.REFRESH_S` anyway (its age shows that a controller is scheduling)."""
        summary = waiting.summarize(rnd, self._clock())
        last = self._waiting
        if (
            last is not None
            and last.same_as(summary)
            and (summary.at - last.at).total_seconds() < waiting.REFRESH_S
        ):
            return
        self.queue.scheduling.record_waiting(summary)
        self._waiting = summary

    def _launch(self, job: JobRecord) -> None:
        shape = Shape(job.gpus, job.gpu_type, job.cpus, job.memory_gb)
        extra = launch_extra(job, self._rate(job))
        try:
            self.inflight[job.id] = self.backend.launch(
                job.id,
                job.attempt,
                job.spec,
                job.output_uri,
                shape=shape,
                node_id=job.node_id,
                extra=extra,
            )
        except Exception as err:  # noqa: BLE001 - Ray refused the task: try again later
            log.warning("job %s: launch failed: %s", job.id, err)
            self._lost(job, FailureKind.infra, f"launch failed: {type(err).__name__}: {err}")

    def _autoscale(self) -> None:
        if self.autoscaler is not None and self.autoscaler.due():
            self.autoscaler.update(self.queue.scheduling.demand())

    # -- ending attempts --------------------------------------------------------------------

    def _succeed(self, job: JobRecord, out: dict[str, Any], reason: str, **guard: Any) -> None:
        spend = self._spend(job)
        result = {**out, "cost_usd": spend[1], "accelerator": job.accelerator}
        ended = self._end(
            job,
            JobStatus.succeeded,
            reason,
            spend=spend,
            result=result,
            node=out.get("node"),
            step=job.total_steps or job.step,
            **guard,
        )
        if ended and out.get("recovered_from_sidecar"):
            # The worker deletes the checkpoints once its adapter is complete; one lost between
            # its upload and that clean-up left them behind.
            reconcile.discard_checkpoints(job)

    def _lost(
        self,
        job: JobRecord,
        kind: FailureKind,
        error: str,
        *,
        charge: bool = True,
        preempted: bool = False,
        **guard: Any,
    ) -> None:
        """An attempt ended without an adapter: gather the facts, apply `recovery.decide`.
        `charge=False` (the controller was lost) or `preempted` (its node was reclaimed with
        notice): always retried, budget untouched."""
        # The one bucket look-up: a worker lost after its upload left a complete adapter.
        done = reconcile.completed_result(job) if kind is FailureKind.infra else None
        column = RETRY_COLUMN[kind]
        loss = Loss(
            kind,
            retries_used=getattr(job, column),
            charged=charge,
            adapter_complete=done is not None,
            preempted=preempted,
        )
        verdict = decide(self.config.retry, loss)
        if verdict.action is Action.succeed:
            assert done is not None
            # It finished uploading before it was lost: record it, never run it again.
            self._succeed(job, done, "adapter found complete in the bucket", **guard)
            return
        failure = {"failure_kind": kind, "failure_reason": error}
        info = {"kind": kind.value, "error": error, "preempted": preempted}
        if verdict.action is Action.fail:
            self._end(job, JobStatus.failed, f"{kind} error: {error}", info, **failure, **guard)
            return
        fields: dict[str, Any] = {
            "attempt": job.attempt + 1,
            "not_before": self._clock() + timedelta(seconds=verdict.delay_s),
            **failure,
        }
        if verdict.retries_used is not None:
            fields[column] = verdict.retries_used
        what = f"{error}; requeued (no retry charged)" if preempted else None
        self._end(
            job,
            JobStatus.queued,
            f"attempt {job.attempt} {what or f'lost ({kind}): {error}; retrying'}"
            + (f" in {verdict.delay_s:g} s" if verdict.delay_s else ""),
            info,
            **fields,
            **guard,
        )

    def _end(
        self,
        job: JobRecord,
        to: JobStatus,
        reason: str,
        info: dict[str, Any] | None = None,
        *,
        spend: tuple[float | None, float | None] | None = None,
        **fields: Any,
    ) -> bool:
        """End the current attempt: `to`, with its cost added and its facts in the event.

        Only while the job's lease is still the one in `job` (ours, or the dead controller's
        on a takeover): a controller that lost the job meanwhile writes nothing."""
        fields.setdefault("lease_owner_was", job.lease_owner)
        part = self._shares.get(job.id, 1.0)  # a pack member's part of the attempt (`_spend`)
        spent, total = spend or self._spend(job)
        data = {**self._attempt_data(job, spent), **(info or {})}
        ended = self._try(job.id, ACTIVE, to, reason, data=data, cost_usd=total, **fields)
        if ended:  # its GPU-hours to its owner's fair share
            fairshare.attempt_ended(
                self.queue.scheduling._writer, job, to is JobStatus.succeeded,
                now=self._clock(), halflife_s=self.config.halflife_s, part=part,
            )  # fmt: skip
        return ended

    # -- helpers ----------------------------------------------------------------------------

    def _forget(self, job_id: str) -> Attempt:
        """Drop an attempt we no longer track; its node has capacity back (or soon will)."""
        attempt = self.inflight.pop(job_id)
        if attempt.node_id:
            self._freed[attempt.node_id] = time.monotonic()
        return attempt

    def _rate(self, job: JobRecord) -> float | None:
        return hourly_rate(
            self.config.prices, gpus=job.gpus, cpus=job.cpus, accelerator=job.accelerator
        )

    def _spend(self, job: JobRecord) -> tuple[float | None, float | None]:
        """(this attempt's cost, the job's total so far) as the attempt ends now."""
        started = aware(job.dispatched_at)
        seconds = (self._clock() - started).total_seconds() if started else 0.0
        # A pack's attempt is paid once, split between its jobs by the work each did.
        spent = attempt_cost(self._rate(job), seconds * self._shares.pop(job.id, 1.0))
        if spent is None:
            return None, job.cost_usd
        return spent, round((job.cost_usd or 0.0) + spent, 6)

    @staticmethod
    def _attempt_data(job: JobRecord, spent: float | None) -> dict[str, Any]:
        return {
            "attempt": job.attempt,
            "node_id": job.node_id,
            "node": job.node,
            "accelerator": job.accelerator,
            "cost_usd": spent,
        }

    def _lease_until(self) -> datetime:
        return self._clock() + timedelta(seconds=self.config.lease_s)

    def _try(self, job_id: str, expected: Any, to: JobStatus, reason: str, **fields: Any) -> bool:
        """A transition that may lose a race (cancel vs finish, two controllers): log, go on."""
        try:
            self.queue.transition(job_id, expected=expected, to=to, reason=reason, **fields)
            log.info("job %s -> %s: %s", job_id, to.value, reason)
            return True
        except InvalidTransition as err:
            log.info("job %s: %s", job_id, err)
            return False
