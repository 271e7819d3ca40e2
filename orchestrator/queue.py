"""The job queue: submit, look up, list, claim, and change status with a compare-and-set.

`Queue._transition` is the only code in lorajobs that writes `jobs.status`; every change it makes
appends a `job_events` row in the same transaction. Everything returned is a frozen record,
detached from any session, so callers never hold a database connection by accident.

Correctness under several controllers/processes rests on two things: on PostgreSQL the row is
locked (`FOR UPDATE`, and `SKIP LOCKED` when picking candidates) before its status is checked;
on SQLite every writing transaction starts with `BEGIN IMMEDIATE`, which serialises writers.
In both cases the UPDATE also repeats the status it read (compare-and-set) as a last guard.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, Select, insert, select, update
from sqlalchemy.exc import IntegrityError

from jobspecs import AnyJobSpec, spec_to_dict
from jobspecs.errors import InvalidInput, InvalidTransition, JobNotFound, LoraJobsError
from orchestrator.db import JobEventRow, JobRow, new_job_id, utcnow, write_engine
from orchestrator.records import EventRecord, JobRecord, dump_json, event_record, job_record
from orchestrator.states import ALLOWED, FailureKind, JobStatus

__all__ = ["EventRecord", "JobRecord", "Queue"]

JOBS = JobRow.__table__
EVENTS = JobEventRow.__table__

MIN_PREFIX = 4
_HEX_RE = re.compile(r"^[0-9a-f]+$")

# Columns a caller may set along with a status change; timestamps and status are ours.
_SETTABLE = frozenset(
    {"failure_kind", "failure_reason", "attempt", "result", "node", "cancel_requested"}
    | {"lease_owner", "lease_expires_at", "step", "total_steps", "loss", "it_per_s"}
)
_ACTIVE = (JobStatus.dispatched.value, JobStatus.running.value)


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


class Queue:
    """All reads and writes of jobs and their events, on one engine."""

    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] = utcnow):
        self.engine = engine
        self._writer = write_engine(engine)
        self._clock = clock
        self._postgres = engine.dialect.name == "postgresql"

    # ---- submit ------------------------------------------------------------------------

    def submit(
        self, spec: AnyJobSpec, *, output_uri: str, idempotency_key: str | None = None
    ) -> tuple[JobRecord, bool]:
        """Queue a job; returns (job, created). A repeated idempotency key returns the job it
        first created (and writes nothing), even when the repeats race from other processes."""
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
        **fields: Any,
    ) -> JobRecord:
        """Move a job from one of `expected` to `to`, setting `fields` and appending an event.

        Raises InvalidTransition (and writes nothing) if the job is not in `expected`, or if
        `to` is not allowed from where it is. Entering dispatched / running / a terminal state
        stamps `dispatched_at` / `started_at` / `finished_at` (terminal also drops the lease);
        going back to queued clears those stamps, and the failure and lease columns unless
        `fields` sets them. `fields`: failure_kind, failure_reason, attempt, result, node,
        cancel_requested, lease_owner, lease_expires_at, step, total_steps, loss, it_per_s.
        """
        with self._writer.begin() as conn:
            return self._transition(conn, job_id, expected, to, reason, data, fields)

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
        to = JobStatus(to)
        wanted = _statuses(expected)
        values = _column_values(fields)
        if not reason:
            raise ValueError("a status change needs a reason")
        row = conn.execute(
            select(JOBS.c.status).where(JOBS.c.id == job_id).with_for_update()
        ).first()
        if row is None:
            raise JobNotFound(f"no job {job_id!r}")
        current = JobStatus(row.status)
        if current not in wanted:
            names = "/".join(sorted(s.value for s in wanted))
            raise InvalidTransition(
                f"job {job_id} is {current}, not {names}: cannot move it to {to}"
            )
        if to not in ALLOWED[current]:
            raise InvalidTransition(f"job {job_id}: {current} -> {to} is not an allowed change")

        now = self._clock()
        values.update(status=to.value, updated_at=now)
        if to is JobStatus.dispatched:
            values["dispatched_at"] = now
        elif to is JobStatus.running:
            values["started_at"] = now
        elif to is JobStatus.queued:
            # A new attempt starts clean; the events keep the history of the old one.
            values.update(dispatched_at=None, started_at=None, finished_at=None)
            for column in ("failure_kind", "failure_reason", "lease_owner", "lease_expires_at"):
                values.setdefault(column, None)
        if to.is_terminal():
            values["finished_at"] = now
            values.setdefault("lease_owner", None)
            values.setdefault("lease_expires_at", None)

        # Compare-and-set on the status just read: a no-op if anything moved it meanwhile.
        result = conn.execute(
            update(JOBS)
            .where(JOBS.c.id == job_id, JOBS.c.status == current.value)
            .values(**values)
        )
        if result.rowcount != 1:
            raise InvalidTransition(f"job {job_id} changed status concurrently: not moved to {to}")
        self._append_event(conn, job_id, now, current, to, reason, data)
        return self._get_exact(conn, job_id)

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

    # ---- scheduling --------------------------------------------------------------------

    def _candidates(self, limit: int) -> Select[Any]:
        query = (
            select(JOBS)
            .where(JOBS.c.status == JobStatus.queued.value)
            .order_by(JOBS.c.priority.desc(), JOBS.c.created_at.asc(), JOBS.c.id.asc())
            .limit(limit)
        )
        # Rows another controller is claiming right now are skipped, not waited for.
        return query.with_for_update(skip_locked=True) if self._postgres else query

    def claim_queued(self, limit: int) -> list[JobRecord]:
        """Queued jobs in the order the scheduler should consider them (read only: moving one
        to dispatched is `dispatch`, whose compare-and-set lets only one controller win)."""
        with self.engine.begin() as conn:
            return [job_record(r) for r in conn.execute(self._candidates(limit))]

    def dispatch(self, job_id: str, *, reason: str = "dispatched", **fields: Any) -> JobRecord:
        """queued → dispatched; InvalidTransition if another controller got there first."""
        return self.transition(
            job_id, expected=JobStatus.queued, to=JobStatus.dispatched, reason=reason, **fields
        )

    def claim(
        self,
        limit: int,
        *,
        choose: Callable[[list[JobRecord]], Iterable[JobRecord]] | None = None,
        reason: str = "dispatched",
        **fields: Any,
    ) -> list[JobRecord]:
        """Pick and dispatch jobs in one transaction: up to `limit` queued candidates (best
        first) are passed to `choose` (the scheduler policy; default: all of them) and the
        ones it returns move to dispatched. Two controllers never receive the same job."""
        with self._writer.begin() as conn:
            candidates = [job_record(r) for r in conn.execute(self._candidates(limit))]
            chosen = list(choose(candidates)) if choose is not None else candidates
            known = {c.id for c in candidates}
            claimed = []
            for job in chosen:
                if job.id not in known:
                    raise ValueError(f"choose() returned job {job.id}, which was not a candidate")
                claimed.append(
                    self._transition(
                        conn, job.id, JobStatus.queued, JobStatus.dispatched, reason, None, fields
                    )
                )
            return claimed

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

    def retry(self, ref: str, *, reason: str = "retried by user") -> JobRecord:
        """Manual retry: failed → queued as a new attempt (resumes from its last checkpoint)."""
        job = self.get(ref)
        if job.status is not JobStatus.failed:
            raise InvalidInput(f"job {job.id} is {job.status}: only failed jobs can be retried")
        return self.transition(
            job.id,
            expected=JobStatus.failed,
            to=JobStatus.queued,
            reason=reason,
            attempt=job.attempt + 1,
            cancel_requested=False,
        )
