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

from sqlalchemy import Connection, Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from lorajobs.jobspecs.failures import (
    InvalidInput,
    InvalidTransition,
    JobNotFound,
    LoraJobsError,
)
from lorajobs.orchestrator.db import EVENTS, JOBS, DbClock, new_job_id, write_engine
from lorajobs.orchestrator.records import (
    Change,
    EventRecord,
    JobRecord,
    dump_json,
    event_record,
    job_record,
)
from lorajobs.orchestrator.scheduling import Scheduling
from lorajobs.orchestrator.states import JobStatus
from lorajobs.orchestrator.transitions import UNSET, checked, compare_and_set, status_set

if TYPE_CHECKING:  # the spec models load pydantic: only `submit` needs them
    from lorajobs.jobspecs import AnyJobSpec

__all__ = ["Change", "EventRecord", "JobRecord", "Queue"]

MIN_PREFIX = 4
_HEX_RE = re.compile(r"^[0-9a-f]+$")

_ACTIVE = (JobStatus.dispatched.value, JobStatus.running.value)


class Queue:
    """All reads and writes of jobs and their events, on one engine. Its scheduling reads and
    claims are `queue.scheduling` (`lorajobs.orchestrator.scheduling`)."""

    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] | None = None):
        self.engine = engine
        self._writer = write_engine(engine)
        # The database's clock, unless a test injects one: see `db.DbClock`.
        self.clock: Callable[[], datetime] = clock or DbClock(engine)
        self._clock = self.clock
        self._postgres = engine.dialect.name == "postgresql"
        self.scheduling = Scheduling(engine, self._writer, self.clock, self.apply)

    # ---- submit ------------------------------------------------------------------------

    def submit(
        self,
        spec: AnyJobSpec,
        *,
        output_uri: str,
        idempotency_key: str | None = None,
        by: str | None = None,
    ) -> tuple[JobRecord, bool]:
        """Queue a job; returns (job, created). A repeated idempotency key returns the job it
        first created (and writes nothing), even when the repeats race from other processes.
        `by` names who submitted it (an API token) in the submit event."""
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
                            nodes=spec.resources.nodes,
                            max_runtime_s=getattr(spec, "max_runtime", None),
                            created_at=now,
                            updated_at=now,
                            cancel_requested=False,
                        )
                    )
                    self._append_event(
                        conn, job_id, now, None, JobStatus.queued, "submitted", _by(None, by)
                    )
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

    def get(self, ref: str, *, owner: str | None = None) -> JobRecord:
        """The job with id `ref`, or the one job whose id starts with `ref` (4+ characters).
        With `owner`, only that owner's jobs are looked at: another owner's job is not found,
        and does not make a prefix ambiguous."""
        prefix = ref.strip().lower()
        if not prefix or not _HEX_RE.match(prefix):
            raise JobNotFound(f"no job {ref!r}")
        if len(prefix) < MIN_PREFIX:
            raise InvalidInput(
                f"job id prefix {ref!r} is too short: give at least {MIN_PREFIX} characters"
            )
        with self.engine.connect() as conn:
            query = select(JOBS).where(JOBS.c.id.like(prefix + "%"))
            if owner is not None:
                query = query.where(JOBS.c.owner == owner)
            rows = conn.execute(query.order_by(JOBS.c.id).limit(5)).all()
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
        name: str | None = None,
        limit: int | None = None,
        before: tuple[datetime, str] | None = None,
    ) -> list[JobRecord]:
        """Jobs, newest first, optionally only those in `statuses` / of `owner` / named `name`.
        `before` = (created_at, id) of the last job of the previous page: keyset pagination,
        which stays fast and stable however deep the page and however many jobs arrive."""
        query = select(JOBS).order_by(JOBS.c.created_at.desc(), JOBS.c.id.desc())
        if before is not None:
            at, job_id = before
            query = query.where(
                (JOBS.c.created_at < at) | ((JOBS.c.created_at == at) & (JOBS.c.id < job_id))
            )
        if name is not None:
            query = query.where(JOBS.c.name == name)
        if statuses is not None:
            wanted = sorted(s.value for s in status_set(statuses))
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
        lease_owner_was: str | None = UNSET,
        **fields: Any,
    ) -> JobRecord:
        """Move a job from one of `expected` to `to`, setting `fields` and appending an event.

        Raises InvalidTransition (and writes nothing) if the job is not in `expected`, if `to`
        is not allowed from where it is, or (when `lease_owner_was` is given) if its lease is not
        held by `lease_owner_was`. Entering dispatched / running / a terminal state stamps
        `dispatched_at` / `started_at` / `finished_at` (terminal also drops the lease); going
        back to queued clears those stamps, the placement, and the failure and lease columns
        unless `fields` sets them. `fields`: any of `transitions.SETTABLE`.
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
        lease_owner_was: str | None = UNSET,
    ) -> list[JobRecord]:
        """The one writer of `jobs.status`: all of `changes` (one job each) or none of them.

        Each row is locked and its status read first; the UPDATE then repeats that status
        (compare-and-set) and every change appends its event, in the caller's transaction.
        """
        to = JobStatus(to)
        wanted = status_set(expected)
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
            (change, *checked(change, current_of, wanted, to, lease_owner_was, now))
            for change in changes
        ]

        compare_and_set(conn, [(c.job_id, current, values) for c, current, values in planned], to)
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
        by_id = {r.id: job_record(r) for r in conn.execute(select(JOBS).where(JOBS.c.id.in_(ids)))}
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
                update(JOBS).where(JOBS.c.id == job_id, JOBS.c.status.in_(_ACTIVE)).values(**values)
            )
        return result.rowcount == 1

    def request_cancel(
        self, ref: str, *, owner: str | None = None, by: str | None = None
    ) -> JobRecord:
        """Cancel a job: a queued one at once; a dispatched/running one is flagged
        (`cancel_requested`) for the controller, which stops it and records the end.
        `owner` limits the lookup to that owner's jobs; `by` is recorded in the event."""
        for _ in range(10):
            job = self.get(ref, owner=owner)
            if job.status.is_terminal():
                raise InvalidInput(f"job {job.id} is already {job.status}")
            if job.status is JobStatus.queued:
                try:
                    return self.transition(
                        job.id,
                        expected=JobStatus.queued,
                        to=JobStatus.cancelled,
                        reason="cancelled by user",
                        data=_by(None, by),
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
                    if by is not None:  # who asked; the controller records the end
                        self._append_event(
                            conn,
                            job.id,
                            self._clock(),
                            job.status,
                            job.status,
                            "cancel requested",
                            _by(None, by),
                        )
                    return self._get_exact(conn, job.id)
        raise InvalidTransition(f"job {ref}: status kept changing, cancel not recorded; try again")

    def set_priority(
        self, ref: str, priority: int, *, owner: str | None = None, by: str | None = None
    ) -> JobRecord:
        """Reprioritise a job that is still queued (its spec's priority changes with it). Not a
        status change, but recorded as an event (queued -> queued) so `show` lists it."""
        if not -100 <= priority <= 100:
            raise InvalidInput(f"priority must be between -100 and 100 (got {priority})")
        job = self.get(ref, owner=owner)
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
            self._append_event(
                conn,
                job.id,
                self._clock(),
                JobStatus.queued,
                JobStatus.queued,
                f"priority {job.priority} -> {priority}",
                _by({"priority": priority, "was": job.priority}, by),
            )
            return self._get_exact(conn, job.id)

    def retry(
        self,
        ref: str,
        *,
        reason: str = "retried by user",
        owner: str | None = None,
        by: str | None = None,
    ) -> JobRecord:
        """Manual retry: failed or cancelled → queued as a new attempt (resumes from its last
        checkpoint, which a failed or cancelled attempt keeps)."""
        job = self.get(ref, owner=owner)
        if job.status not in (JobStatus.failed, JobStatus.cancelled):
            raise InvalidInput(
                f"job {job.id} is {job.status}: only failed or cancelled jobs can be retried"
            )
        # A manual retry starts with fresh budgets; the events keep the history.
        return self.transition(
            job.id,
            expected=(JobStatus.failed, JobStatus.cancelled),
            to=JobStatus.queued,
            reason=reason,
            data=_by({"attempt": job.attempt + 1, "manual": True}, by),
            attempt=job.attempt + 1,
            cancel_requested=False,
            not_before=None,
            infra_retries=0,
            user_retries=0,
            internal_retries=0,
        )


def _by(data: dict[str, Any] | None, by: str | None) -> dict[str, Any] | None:
    """An event's data with who made the change (an API token), when one is known."""
    return data if by is None else {**(data or {}), "by": by}
