"""The scheduling side of the queue: reading candidates and claiming them for a controller.

`Scheduling` is a part of `Queue` (`queue.scheduling`), built by it with the queue's engine and
its one status writer: the round that reads what active jobs hold and the best queued
candidates, lets the scheduling policy place them and dispatches the placed ones in one
transaction; the demand the autoscaler is told; why queued jobs wait (published by the
controller, read by the CLI); and the older per-call claim helpers. Status still changes only
through the queue's compare-and-set writer (`Queue.apply`).

The order candidates are read in is the policy's own (`scheduler.aged_priority`, the same
formula applied to SQL columns) and so are the job classes (`scheduler.CLASS_FIELDS`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

from sqlalchemy import (
    Connection,
    DateTime,
    Engine,
    Integer,
    Select,
    String,
    case,
    cast,
    func,
    literal,
    or_,
    select,
    type_coerce,
)

from lorajobs.orchestrator.db import JOBS, SCHEDULER_STATE, UTCDateTime
from lorajobs.orchestrator.records import Change, JobRecord, aware, job_record
from lorajobs.orchestrator.scheduler import (
    CLASS_FIELDS,
    Candidate,
    Hold,
    Placement,
    Shape,
    aged_level,
    node_shape,
)
from lorajobs.orchestrator.states import JobStatus
from lorajobs.orchestrator.waiting import WaitSummary

_WAITING = "waiting"
_ACTIVE = (JobStatus.dispatched.value, JobStatus.running.value)
# Arbitrary constant: PostgreSQL advisory lock held by the controller running a scheduling round,
# so that two controllers never count the same free GPU twice.
_SCHEDULE_LOCK_KEY = 0x6C6A7363686564  # "ljsched"


def _sqlite_floor(x: Any) -> Any:
    """floor() for SQLite builds without math functions (the values floored are >= 0 here)."""
    return cast(x, Integer)


def hold_of(r: Any, now: datetime) -> Hold:
    """What an active job's row holds, with when it is expected to end (from its reported
    speed: steps left / it per s) and whether it has been asked to stop (preempted)."""
    started, preempt_at = aware(r.dispatched_at), aware(r.preempt_at)
    ends = None
    if r.it_per_s and r.total_steps and r.step is not None:
        ends = now + timedelta(seconds=max(0, r.total_steps - r.step) / r.it_per_s)
    preempting = preempt_at is not None and started is not None and preempt_at >= started
    return Hold(
        r.id, r.owner, r.node_id, r.gpus, r.cpus, r.memory_gb,
        r.priority, started, ends, preempt_at, preempting,
        r.nodes, tuple(r.gang_nodes.split(",")) if r.gang_nodes else (),
    )  # fmt: skip


def active_holds(conn: Connection, now: datetime) -> list[Hold]:
    """What every active job holds, as of `now`: what a round places around and what fair
    share counts as running (`fairshare.report` reads the same, so `lorajobs usage` shows
    what the scheduler ranks by). A pack is its first job's hold alone."""
    rows = conn.execute(
        select(
            JOBS.c.id,
            JOBS.c.owner,
            JOBS.c.node_id,
            JOBS.c.gpus,
            JOBS.c.cpus,
            JOBS.c.memory_gb,
            JOBS.c.nodes,
            JOBS.c.gang_nodes,
            JOBS.c.priority,
            JOBS.c.dispatched_at,
            JOBS.c.preempt_at,
            JOBS.c.step,
            JOBS.c.total_steps,
            JOBS.c.it_per_s,
        ).where(
            JOBS.c.status.in_(_ACTIVE),
            # A pack's members share its first job's resources (orchestrator/packing.py).
            or_(JOBS.c.pack_id.is_(None), JOBS.c.pack_id == JOBS.c.id),
        )
    )
    return [hold_of(r, now) for r in rows]


class RoundPlanner(Protocol):
    """The scheduling policy's side of a round (`lorajobs.orchestrator.scheduler.Round`)."""

    @property
    def done(self) -> bool: ...

    def offer(self, candidates: list[Candidate]) -> list[Placement]: ...


#: The queue's compare-and-set writer: (connection, changes, expected, to) -> records.
Apply = Callable[..., list[JobRecord]]


class Scheduling:
    """Scheduling reads and claims, on the queue's engine and through its status writer."""

    def __init__(
        self, engine: Engine, writer: Engine, clock: Callable[[], datetime], apply: Apply
    ) -> None:
        self.engine = engine
        self._writer = writer
        self._clock = clock
        self._apply = apply
        self._postgres = engine.dialect.name == "postgresql"

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
            for job in chosen:
                if job.id not in known:
                    raise ValueError(f"choose() returned job {job.id}, which was not a candidate")
            changes = [Change(job.id, reason, fields) for job in chosen]
            return self._apply(conn, changes, JobStatus.queued, JobStatus.dispatched)

    def schedule(
        self,
        start: Callable[[list[Hold]], RoundPlanner],
        *,
        per_class: int,
        aging_s: float,
        lease_owner: str,
        lease_expires_at: datetime,
        page_size: int = 1024,
    ) -> list[JobRecord]:
        """One scheduling round in one transaction: read what active jobs hold, start the
        policy's round on it (`start(holds)`), offer it the queued candidates best first, page
        by page until it is done or they run out, and dispatch what it placed.

        Candidates are the oldest `per_class` queued jobs (not in backoff) of every (priority,
        owner, resource shape) class. Within a class jobs are interchangeable for the policy
        (same priority, same limits, same fit; aging only grows with age), so no job beyond the
        first `per_class` of its class could be chosen before them, and a class that cannot run
        (a GPU type with no node, an owner at its limit) never hides another class behind it.
        Pages come in the policy's order (aged level with `aging_s`, the owners' fair-share
        factors the planner ranks by (its `fair`), then age), so a round that fills up early
        reads one page, not the whole queue.

        On PostgreSQL rounds of different controllers are serialised by an advisory lock (a
        controller that finds it taken skips its round) so free capacity is never counted twice,
        and the chosen rows are claimed with FOR UPDATE SKIP LOCKED; on SQLite the transaction
        holds the write lock. Either way the compare-and-set in `Queue.apply` is the last guard.
        """
        now = self._clock()
        with self._writer.begin() as conn:
            if (
                self._postgres
                and not conn.execute(
                    select(func.pg_try_advisory_xact_lock(_SCHEDULE_LOCK_KEY))
                ).scalar_one()
            ):
                return []
            planner = start(self._holds(conn))
            fair: Mapping[str, float] = getattr(planner, "fair", None) or {}
            placements: list[Placement] = []
            known: set[str] = set()
            offset = 0
            while not planner.done:
                page = self._class_heads(conn, per_class, now, aging_s, page_size, offset, fair)
                known.update(c.id for c in page)
                placements += planner.offer(page)
                if len(page) < page_size:
                    break
                offset += page_size
            if not placements:
                return []
            ids = [p.job_id for p in placements]
            if not known.issuperset(ids) or len(set(ids)) != len(ids):
                raise ValueError("the planner must place each candidate at most once")
            if self._postgres:
                # Rows another transaction is changing right now (a cancel) are skipped.
                locked = set(
                    conn.execute(
                        select(JOBS.c.id)
                        .where(JOBS.c.id.in_(ids), JOBS.c.status == JobStatus.queued.value)
                        .with_for_update(skip_locked=True)
                    ).scalars()
                )
                placements = [p for p in placements if p.job_id in locked]
            changes = _dispatch_changes(placements, lease_owner, lease_expires_at)
            return self._apply(conn, changes, JobStatus.queued, JobStatus.dispatched)

    def _holds(self, conn: Connection) -> list[Hold]:
        return active_holds(conn, self._clock())

    def _age_s(self, now: datetime) -> Any:
        """SQL: seconds since `created_at` (what aging adds to a job's priority)."""
        if self._postgres:
            return func.extract("epoch", literal(now, UTCDateTime()) - JOBS.c.created_at)
        stamp = now.astimezone(timezone.utc).replace(tzinfo=None).isoformat(" ")
        return (func.julianday(stamp) - func.julianday(JOBS.c.created_at)) * 86400.0

    def _class_heads(
        self,
        conn: Connection,
        per_class: int,
        now: datetime,
        aging_s: float,
        limit: int,
        offset: int,
        fair: Mapping[str, float],
    ) -> list[Candidate]:
        # created_at comes back raw and is parsed below: the generic timestamp type costs more
        # than the rest of a row when a round reads thousands.
        raw_type = DateTime(timezone=True) if self._postgres else String()
        cols = (
            JOBS.c.id,
            JOBS.c.owner,
            JOBS.c.priority,
            type_coerce(JOBS.c.created_at, raw_type).label("created_at"),
            JOBS.c.gpus,
            JOBS.c.gpu_type,
            JOBS.c.cpus,
            JOBS.c.memory_gb,
            JOBS.c.nodes,
        )
        rank = (
            func.row_number()
            .over(
                partition_by=tuple(JOBS.c[name] for name in CLASS_FIELDS),
                order_by=(JOBS.c.created_at, JOBS.c.id),
            )
            .label("rank")
        )
        floor = func.floor if self._postgres else _sqlite_floor
        level = aged_level(JOBS.c.priority, self._age_s(now), aging_s, floor)
        # The owners' fair-share factors, as the policy's sort key has them (0: no usage).
        share = (
            case({o: literal(float(f)) for o, f in fair.items()}, value=JOBS.c.owner, else_=0.0)
            if fair
            else literal(0.0)
        )
        ranked = (
            select(
                *cols,
                rank,
                level.label("level"),
                share.label("share"),
                JOBS.c.created_at.label("created_sort"),
            )
            .where(
                JOBS.c.status == JobStatus.queued.value,
                or_(JOBS.c.not_before.is_(None), JOBS.c.not_before <= now),
            )
            .subquery()
        )
        rows = conn.execute(
            select(*(ranked.c[c.name] for c in cols))
            .where(ranked.c.rank <= per_class)
            .order_by(ranked.c.level.desc(), ranked.c.share, ranked.c.created_sort, ranked.c.id)
            .limit(limit)
            .offset(offset)
        ).all()
        utc, parse = timezone.utc, datetime.fromisoformat
        return [
            Candidate(
                id_,
                owner,
                prio,
                created if self._postgres else parse(created).replace(tzinfo=utc),
                gpus,
                gpu_type,
                cpus,
                mem,
                nodes=nodes,
            )
            for id_, owner, prio, created, gpus, gpu_type, cpus, mem, nodes in rows
        ]

    def has_queued(self) -> bool:
        """Whether any job is waiting (cheap: the scheduling index answers it)."""
        with self.engine.connect() as conn:
            return (
                conn.execute(
                    select(JOBS.c.id).where(JOBS.c.status == JobStatus.queued.value).limit(1)
                ).first()
                is not None
            )

    def demand(self) -> list[tuple[Shape, bool, int]]:
        """(shape, queued?, how many) over queued and active jobs: what the autoscaler is told.
        A gang counts as its per-node share once per node (`gangs.py`), so the autoscaler
        starts nodes it fits on."""
        shape = (JOBS.c.gpus, JOBS.c.gpu_type, JOBS.c.cpus, JOBS.c.memory_gb, JOBS.c.nodes)
        queued = (JOBS.c.status == JobStatus.queued.value).label("queued")
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(*shape, queued, func.count())
                .where(JOBS.c.status.in_((JobStatus.queued.value, *_ACTIVE)))
                .group_by(*shape, queued)
            ).all()
        return [
            (
                node_shape(r.gpus, r.gpu_type, r.cpus, r.memory_gb, r.nodes),
                bool(r.queued),
                int(r[6]) * int(r.nodes),
            )
            for r in rows
        ]

    def record_waiting(self, summary: WaitSummary) -> None:
        """Publish why queued jobs wait (the last round's summary): one row, replaced."""
        if self._postgres:
            from sqlalchemy.dialects.postgresql import insert as upsert
        else:
            from sqlalchemy.dialects.sqlite import insert as upsert
        values = {"updated_at": summary.at, "data": summary.to_json()}
        stmt = upsert(SCHEDULER_STATE).values(name=_WAITING, **values)
        stmt = stmt.on_conflict_do_update(index_elements=[SCHEDULER_STATE.c.name], set_=values)
        with self._writer.begin() as conn:
            conn.execute(stmt)

    def waiting(self) -> WaitSummary | None:
        """The last published summary of why queued jobs wait; None if none was."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(SCHEDULER_STATE.c.updated_at, SCHEDULER_STATE.c.data).where(
                    SCHEDULER_STATE.c.name == _WAITING
                )
            ).first()
        return None if row is None else WaitSummary.from_json(row.data, at=row.updated_at)


def _dispatch_changes(
    placements: list[Placement], lease_owner: str, lease_expires_at: datetime
) -> list[Change]:
    """queued -> dispatched for each placement: the lease, the node (and a gang's nodes)."""
    return [
        Change(
            p.job_id,
            p.reason or f"dispatched by {lease_owner}",
            {
                "lease_owner": lease_owner,
                "lease_expires_at": lease_expires_at,
                "node_id": p.node_id,
                "accelerator": p.accelerator,
                "node": None,
                "gang_nodes": ",".join((p.data or {}).get("gang_nodes") or []) or None,
                "pack_id": None,  # its own attempt, unless `packing.fill` adds others
            },
            p.data,
        )
        for p in placements
    ]
