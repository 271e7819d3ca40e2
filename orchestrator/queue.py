"""The job queue: submit, look up, list, claim, and change status with a compare-and-set.

`Queue.apply` is the only code in lorajobs that writes `jobs.status`; every change it makes
appends a `job_events` row in the same transaction. Everything returned is a frozen record,
detached from any session, so callers never hold a database connection by accident.

Correctness under several controllers/processes rests on two things: on PostgreSQL the row is
locked (`FOR UPDATE`, and `SKIP LOCKED` when picking candidates) before its status is checked;
on SQLite every writing transaction starts with `BEGIN IMMEDIATE`, which serialises writers.
In both cases the UPDATE also repeats the status it read (compare-and-set) as a last guard.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError

from lorajobs.jobspecs.failures import InvalidInput, InvalidTransition, JobNotFound, LoraJobsError
from lorajobs.orchestrator.db import EVENTS, JOBS, new_job_id, utcnow, write_engine
from lorajobs.orchestrator.scheduling import Scheduling
from lorajobs.orchestrator.records import (
    Change,
    EventRecord,
    JobRecord,
    dump_json,
    event_record,
    job_record,
)
from lorajobs.jobspecs.failures import FailureKind
from lorajobs.orchestrator.states import ALLOWED, JobStatus

if TYPE_CHECKING:  # the spec models load pydantic: only `submit` needs them
    from lorajobs.jobspecs import AnyJobSpec

__all__ = ["Change", "EventRecord", "JobRecord", "Queue"]

MIN_PREFIX = 4
_HEX_RE = re.compile(r"^[0-9a-f]+$")

# Columns a caller may set along with a status change; timestamps and status are ours.
_SETTABLE = frozenset(
    {"failure_kind", "failure_reason", "attempt", "result", "node", "cancel_requested"}
    | {"lease_owner", "lease_expires_at", "step", "total_steps", "loss", "it_per_s"}
    | {"not_before", "infra_retries", "user_retries", "internal_retries", "node_id"}
    | {"accelerator", "cost_usd"}
)
_ACTIVE = (JobStatus.dispatched.value, JobStatus.running.value)
_UNSET: Any = object()


def _statuses(value: JobStatus | str | Iterable[JobStatus | str]) -> frozenset[JobStatus]:
    if isinstance(value, (JobStatus, str)):
        return frozenset({JobStatus(value)})
    return frozenset(JobStatus(v) for v in value)


def _column_values(fields: dict[str, Any]) -> dict[str, Any]:
    """Validate caller-supplied columns and convert them to what is stored."""
    if "status" in fields:
        raise TypeError("status is set by `to=`, not as a field")
    unknown = set(fields) - _SETTABLE
    if unknown:
        raise TypeError(f"cannot set {', '.join(sorted(unknown))} with a transition")
    out = dict(fields)
    if out.get("failure_kind") is not None:
        out["failure_kind"] = FailureKind(out["failure_kind"]).value
    if "result" in out and out["result"] is not None:
        out["result"] = dump_json(out["result"])
    return out


def _stamped(values: dict[str, Any], to: JobStatus, now: datetime) -> dict[str, Any]:
    """`values` plus what entering `to` always sets: status, timestamps, cleared columns."""
    values = {**values, "status": to.value, "updated_at": now}
    if to is JobStatus.dispatched:
        values["dispatched_at"] = now
    elif to is JobStatus.running:
        values["started_at"] = now
    elif to is JobStatus.queued:
        # A new attempt starts clean; the events keep the history of the old one.
        values.update(dispatched_at=None, started_at=None, finished_at=None)
        for column in ("failure_kind", "failure_reason", "lease_owner", "lease_expires_at"):
            values.setdefault(column, None)
        for column in ("node_id", "accelerator"):
            values.setdefault(column, None)
    if to.is_terminal():
        values["finished_at"] = now
        values.setdefault("lease_owner", None)
        values.setdefault("lease_expires_at", None)
    return values


class Queue:
    """All reads and writes of jobs and their events, on one engine. Its scheduling reads and
    claims are `queue.scheduling` (`lorajobs.orchestrator.scheduling`)."""

    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] = utcnow):
        self.engine = engine
        self._writer = write_engine(engine)
        self._clock = clock
        self._postgres = engine.dialect.name == "postgresql"
        self.scheduling = Scheduling(engine, self._writer, clock, self.apply)

    # ---- submit ------------------------------------------------------------------------

    def submit(
        self, spec: AnyJobSpec, *, output_uri: str, idempotency_key: str | None = None
    ) -> tuple[JobRecord, bool]:
        """Queue a job; returns (job, created). A repeated idempotency key returns the job it
        first created (and writes nothing), even when the repeats race from other processes."""
        from lorajobs.jobspecs import spec_to_dict

        spec_json = dump_json(spec_to_dict(spec))
        if idempotency_key is not None:
            if not idempotency_key.strip() or len(idempotency_key) > 255:
                raise InvalidInput("idempotency key must be 1-255 characters")
            existing = self._by_key(idempotency_key, spec_json, output_uri)
            if existing is not None:
                return existing, False
        for _ in range(5):
            job_id, now = new_job_id(), self._clock()
            try:
                with self._writer.begin() as conn:
                    conn.execute(
                        insert(JOBS).values(
                            id=job_id,
                            name=spec.name,
                            kind=spec.kind,
                            owner=spec.owner,
                            priority=spec.priority,
                            status=JobStatus.queued.value,
                            spec=spec_json,
                            output_uri=output_uri,
                            idempotency_key=idempotency_key,
                            attempt=1,
                            gpus=float(spec.resources.gpus),
                            gpu_type=spec.resources.gpu_type,
                            cpus=spec.resources.cpus,
                            memory_gb=spec.resources.memory_gb,
                            max_runtime_s=getattr(spec, "max_runtime", None),
                            created_at=now,
                            updated_at=now,
                            cancel_requested=False,
                        )
                    )
                    self._append_event(conn, job_id, now, None, JobStatus.queued, "submitted")
                    return self._get_exact(conn, job_id), True
            except IntegrityError:
                # Either another process just inserted this idempotency key (use its job), or
                # 48 random bits collided with an existing id (draw again).
                if idempotency_key is not None:
                    existing = self._by_key(idempotency_key, spec_json, output_uri)
                    if existing is not None:
                        return existing, False
        raise LoraJobsError("could not store the job: repeated id conflicts")

    def _by_key(self, key: str, spec_json: str, output_uri: str) -> JobRecord | None:
        """The job an idempotency key already made, if it was made from the same spec."""
        with self.engine.connect() as conn:
            row = conn.execute(select(JOBS).where(JOBS.c.idempotency_key == key)).first()
        if row is None:
            return None
        job = job_record(row)
        if dump_json(job.spec) != spec_json or job.output_uri != output_uri:
            raise InvalidInput(
                f"idempotency key {key!r} was already used for job {job.id} with a different "
                "spec: use a new key for a different job"
            )
        return job

    # ---- reads -------------------------------------------------------------------------

    def get(self, ref: str) -> JobRecord:
        """The job with id `ref`, or the one job whose id starts with `ref` (4+ characters)."""
        prefix = ref.strip().lower()
        if not prefix or not _HEX_RE.match(prefix):
            raise JobNotFound(f"no job {ref!r}")
        if len(prefix) < MIN_PREFIX:
            raise InvalidInput(
                f"job id prefix {ref!r} is too short: give at least {MIN_PREFIX} characters"
            )
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(JOBS).where(JOBS.c.id.like(prefix + "%")).order_by(JOBS.c.id).limit(5)
            ).all()
        if not rows:
            raise JobNotFound(f"no job {ref!r}")
        if len(rows) > 1:
            ids = ", ".join(r.id for r in rows[:4]) + (", ..." if len(rows) > 4 else "")
            raise InvalidInput(f"job id prefix {ref!r} is ambiguous: matches {ids}")
        return job_record(rows[0])

    def list(
        self,
        *,
        statuses: Iterable[JobStatus] | None = None,
        owner: str | None = None,
        limit: int | None = None,
    ) -> list[JobRecord]:
        """Jobs, newest first, optionally only those in `statuses` / of `owner`."""
        query = select(JOBS).order_by(JOBS.c.created_at.desc(), JOBS.c.id.desc())
        if statuses is not None:
            wanted = sorted(s.value for s in _statuses(statuses))
            if not wanted:
                return []
            query = query.where(JOBS.c.status.in_(wanted))
        if owner is not None:
            query = query.where(JOBS.c.owner == owner)
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return [job_record(r) for r in conn.execute(query)]

    def events(self, job_id: str) -> list[EventRecord]:
        """Status changes of one job, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(EVENTS).where(EVENTS.c.job_id == job_id).order_by(EVENTS.c.id)
            ).all()
            if not rows:
                self._get_exact(conn, job_id)  # raises JobNotFound for an unknown id
        return [event_record(r) for r in rows]

    def _get_exact(self, conn: Connection, job_id: str) -> JobRecord:
        row = conn.execute(select(JOBS).where(JOBS.c.id == job_id)).first()
        if row is None:
            raise JobNotFound(f"no job {job_id!r}")
        return job_record(row)

    # ---- status changes ----------------------------------------------------------------

    def transition(
        self,
        job_id: str,
        *,
        expected: JobStatus | Collection[JobStatus],
        to: JobStatus,
        reason: str,
        data: dict[str, Any] | None = None,
        lease_owner_was: str | None = _UNSET,
        **fields: Any,
    ) -> JobRecord:
        """Move a job from one of `expected` to `to`, setting `fields` and appending an event.

        Raises InvalidTransition (and writes nothing) if the job is not in `expected`, if `to`
        is not allowed from where it is, or (when `lease_owner_was` is given) if its lease is not
        held by `lease_owner_was`. Entering dispatched / running / a terminal state stamps
        `dispatched_at` / `started_at` / `finished_at` (terminal also drops the lease); going
        back to queued clears those stamps, the placement, and the failure and lease columns
        unless `fields` sets them. `fields`: any of `_SETTABLE`.
        """
        with self._writer.begin() as conn:
            (job,) = self.apply(
                conn, [Change(job_id, reason, fields, data)], expected, to, lease_owner_was
            )
            return job

    def _transition(
        self,
        conn: Connection,
        job_id: str,
        expected: JobStatus | Collection[JobStatus],
        to: JobStatus,
        reason: str,
        data: dict[str, Any] | None,
        fields: dict[str, Any],
    ) -> JobRecord:
        (job,) = self.apply(conn, [Change(job_id, reason, fields, data)], expected, to)
        return job

    def apply(
        self,
        conn: Connection,
        changes: Sequence[Change],
        expected: JobStatus | Collection[JobStatus],
        to: JobStatus,
        lease_owner_was: str | None = _UNSET,
    ) -> list[JobRecord]:
        """The one writer of `jobs.status`: all of `changes` (one job each) or none of them.

        Each row is locked and its status read first; the UPDATE then repeats that status
        (compare-and-set) and every change appends its event, in the caller's transaction.
        """
        to = JobStatus(to)
        wanted = _statuses(expected)
        ids = [c.job_id for c in changes]
        if len(set(ids)) != len(ids):
            raise ValueError("one change per job")
        if not ids:
            return []
        current_of = {
            r.id: (JobStatus(r.status), r.lease_owner)
            for r in conn.execute(
                select(JOBS.c.id, JOBS.c.status, JOBS.c.lease_owner)
                .where(JOBS.c.id.in_(ids))
                .with_for_update()
            )
        }
        now = self._clock()
        planned = [
            (change, *_checked(change, current_of, wanted, to, lease_owner_was, now))
            for change in changes
        ]

        _compare_and_set(conn, [(c.job_id, current, values) for c, current, values in planned],
                         to)
        conn.execute(
            insert(EVENTS),
            [
                {
                    "job_id": change.job_id,
                    "at": now,
                    "from_status": current.value,
                    "to_status": to.value,
                    "reason": change.reason,
                    "data": dump_json(change.data) if change.data is not None else None,
                }
                for change, current, _ in planned
            ],
        )
        by_id = {
            r.id: job_record(r) for r in conn.execute(select(JOBS).where(JOBS.c.id.in_(ids)))
        }
        return [by_id[i] for i in ids]

    def dispatch(self, job_id: str, *, reason: str = "dispatched", **fields: Any) -> JobRecord:
        """queued → dispatched; InvalidTransition if another controller got there first."""
        return self.transition(
            job_id, expected=JobStatus.queued, to=JobStatus.dispatched, reason=reason, **fields
        )

    def _append_event(
        self,
        conn: Connection,
        job_id: str,
        at: datetime,
        from_status: JobStatus | None,
        to_status: JobStatus,
        reason: str,
        data: dict[str, Any] | None = None,
    ) -> None:
        conn.execute(
            insert(EVENTS).values(
                job_id=job_id,
                at=at,
                from_status=from_status.value if from_status is not None else None,
                to_status=to_status.value,
                reason=reason,
                data=dump_json(data) if data is not None else None,
            )
        )

    # ---- leases ------------------------------------------------------------------------

    def renew_leases(self, owner: str, job_ids: Collection[str], until: datetime) -> int:
        """Extend `owner`'s lease on its active jobs to `until` (the controller's heartbeat).
        Returns how many were renewed; a job whose lease another controller took is left alone."""
        if not job_ids:
            return 0
        with self._writer.begin() as conn:
            result = conn.execute(
                update(JOBS)
                .where(
                    JOBS.c.id.in_(sorted(job_ids)),
                    JOBS.c.lease_owner == owner,
                    JOBS.c.status.in_(_ACTIVE),
                )
                .values(lease_expires_at=until)
            )
        return int(result.rowcount)

    # ---- progress and user requests ----------------------------------------------------

    def record_progress(
        self,
        job_id: str,
        *,
        step: int,
        total_steps: int,
        loss: float | None,
        it_per_s: float | None,
        node: str | None = None,
    ) -> bool:
        """Store the latest progress report of a dispatched/running job (no event). Returns
        False when the job is no longer active: late reports after it finished are dropped."""
        values: dict[str, Any] = {
            "step": step,
            "total_steps": total_steps,
            "loss": loss,
            "it_per_s": it_per_s,
            "updated_at": self._clock(),
        }
        if node is not None:
            values["node"] = node
        with self._writer.begin() as conn:
            result = conn.execute(
                update(JOBS)
                .where(JOBS.c.id == job_id, JOBS.c.status.in_(_ACTIVE))
                .values(**values)
            )
        return result.rowcount == 1

    def request_cancel(self, ref: str) -> JobRecord:
        """Cancel a job: a queued one at once; a dispatched/running one is flagged
        (`cancel_requested`) for the controller, which stops it and records the end."""
        for _ in range(10):
            job = self.get(ref)
            if job.status.is_terminal():
                raise InvalidInput(f"job {job.id} is already {job.status}")
            if job.status is JobStatus.queued:
                try:
                    return self.transition(
                        job.id,
                        expected=JobStatus.queued,
                        to=JobStatus.cancelled,
                        reason="cancelled by user",
                    )
                except InvalidTransition:
                    continue  # dispatched meanwhile: flag it instead
            with self._writer.begin() as conn:
                result = conn.execute(
                    update(JOBS)
                    .where(JOBS.c.id == job.id, JOBS.c.status.in_(_ACTIVE))
                    .values(cancel_requested=True, updated_at=self._clock())
                )
                if result.rowcount == 1:
                    return self._get_exact(conn, job.id)
        raise InvalidTransition(f"job {ref}: status kept changing, cancel not recorded; try again")

    def set_priority(self, ref: str, priority: int) -> JobRecord:
        """Reprioritise a job that is still queued (its spec's priority changes with it). Not a
        status change, but recorded as an event (queued -> queued) so `show` lists it."""
        if not -100 <= priority <= 100:
            raise InvalidInput(f"priority must be between -100 and 100 (got {priority})")
        job = self.get(ref)
        if job.status is not JobStatus.queued:
            raise InvalidInput(
                f"job {job.id} is {job.status}: only queued jobs can be reprioritised"
            )
        spec = {**job.spec, "priority": priority}
        with self._writer.begin() as conn:
            result = conn.execute(
                update(JOBS)
                .where(JOBS.c.id == job.id, JOBS.c.status == JobStatus.queued.value)
                .values(priority=priority, spec=dump_json(spec), updated_at=self._clock())
            )
            if result.rowcount != 1:
                raise InvalidTransition(f"job {job.id} was dispatched meanwhile: priority kept")
            self._append_event(conn, job.id, self._clock(), JobStatus.queued, JobStatus.queued,
                               f"priority {job.priority} -> {priority}",
                               {"priority": priority, "was": job.priority})
            return self._get_exact(conn, job.id)

    def retry(self, ref: str, *, reason: str = "retried by user") -> JobRecord:
        """Manual retry: failed → queued as a new attempt (resumes from its last checkpoint)."""
        job = self.get(ref)
        if job.status is not JobStatus.failed:
            raise InvalidInput(f"job {job.id} is {job.status}: only failed jobs can be retried")
        # A manual retry starts with fresh budgets; the events keep the history.
        return self.transition(
            job.id,
            expected=JobStatus.failed,
            to=JobStatus.queued,
            reason=reason,
            data={"attempt": job.attempt + 1, "manual": True},
            attempt=job.attempt + 1,
            cancel_requested=False,
            not_before=None,
            infra_retries=0,
            user_retries=0,
            internal_retries=0,
        )


def _checked(change: Change, current_of: dict[str, tuple[JobStatus, str | None]],
             wanted: frozenset[JobStatus], to: JobStatus, lease_owner_was: Any,
             now: datetime) -> tuple[JobStatus, dict[str, Any]]:
    """(the job's status now, the columns to set) for one change, or why it is refused."""
    if not change.reason:
        raise ValueError("a status change needs a reason")
    values = _column_values(change.fields)
    if change.job_id not in current_of:
        raise JobNotFound(f"no job {change.job_id!r}")
    current, lease_owner = current_of[change.job_id]
    if current not in wanted:
        names = "/".join(sorted(s.value for s in wanted))
        raise InvalidTransition(
            f"job {change.job_id} is {current}, not {names}: cannot move it to {to}"
        )
    if to not in ALLOWED[current]:
        raise InvalidTransition(f"job {change.job_id}: {current} -> {to} is not an allowed change")
    if lease_owner_was is not _UNSET and lease_owner != lease_owner_was:
        raise InvalidTransition(
            f"job {change.job_id}: its lease is held by {lease_owner}, not "
            f"{lease_owner_was}: not moved to {to}"
        )
    return current, _stamped(values, to, now)


def _compare_and_set(conn: Connection, rows: list[tuple[str, JobStatus, dict[str, Any]]],
                     to: JobStatus) -> None:
    """UPDATE each job only if its status is still the one just read; raise if one moved.
    One executemany per (status read, columns set): usually one for the whole batch."""
    groups: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = {}
    for job_id, current, values in rows:
        key = (current.value, tuple(sorted(values)))
        groups.setdefault(key, []).append(
            {"b_id": job_id, **{f"v_{k}": v for k, v in values.items()}}
        )
    for (status, columns), params in groups.items():
        stmt = (
            update(JOBS)
            .where(JOBS.c.id == bindparam("b_id", type_=JOBS.c.id.type), JOBS.c.status == status)
            .values({c: bindparam(f"v_{c}", type_=JOBS.c[c].type) for c in columns})
        )
        result = conn.execute(stmt, params)
        if result.rowcount != len(params):
            raise InvalidTransition(
                f"job {params[0]['b_id']} changed status concurrently: not moved to {to}"
            )
