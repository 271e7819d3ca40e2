"""The real scheduling policy driven with simulated time: no Ray, no database, no training.

`Sim` keeps a cluster of nodes and a trace of jobs (arrival, GPUs, owner, priority, work in
seconds) and, at every event (an arrival, an end, a preempted job stopping) and every `tick_s`,
runs one `scheduler.Round` exactly as the controller does: holds from the running jobs (their
expected ends from their remaining work, as the workers' reported speed gives them), the nodes'
free resources (`node_views`), the owners' fair-share factors from a `fairshare.Ledger` charged
as attempts end, and the round's decisions applied — placements start, preempted jobs stop
`policy.checkpoint_s` later keeping the work done (they checkpoint on the notice), lose
`restart_s` on their next start, and go back to the queue. Used by the fair-share and
reservation tests and by `bench/trace.py`.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from lorajobs.orchestrator.fairshare import Ledger, Shares, factors
from lorajobs.orchestrator.scheduler import Candidate, Hold, Policy, Round, node_views

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)


@dataclass
class SimJob:
    id: str
    owner: str
    priority: int
    gpus: float
    arrival_s: float
    work_s: float
    #: What the scheduler is told it will take (None: unknown); default: the true work.
    est_s: float | None = None
    remaining_s: float = 0.0
    first_start_s: float | None = None
    end_s: float | None = None
    starts: list[float] = field(default_factory=list)
    preemptions: list[float] = field(default_factory=list)
    #: Reservations made for it while it waited: (when made, when due).
    reserved: list[tuple[float, float]] = field(default_factory=list)
    #: Nodes a gang spans (`gpus` split evenly over them).
    nodes: int = 1

    def __post_init__(self) -> None:
        self.remaining_s = self.work_s


@dataclass
class Running:
    job: SimJob
    node: str
    start_s: float
    #: Work that counts from this start (restart overhead first).
    overhead_s: float
    preempt_at_s: float | None = None
    #: A gang's nodes (empty: just `node`).
    gang: tuple[str, ...] = ()


class Sim:
    """A simulated cluster of `nodes` x `gpus_per_node` GPUs under `policy`."""

    def __init__(
        self,
        jobs: list[SimJob],
        policy: Policy,
        *,
        nodes: int = 4,
        gpus_per_node: int = 8,
        cpus_per_node: int = 64,
        shares: Shares | None = None,
        halflife_s: float = 7 * 86400.0,
        restart_s: float = 30.0,
        tick_s: float = 60.0,
        per_class: int = 64,
    ) -> None:
        self.policy, self.shares, self.halflife_s = policy, shares or Shares(), halflife_s
        self.restart_s, self.tick_s, self.per_class = restart_s, tick_s, per_class
        self.totals = {
            f"n{i}": {"CPU": float(cpus_per_node), "GPU": float(gpus_per_node)}
            for i in range(nodes)
        }
        self.jobs = {j.id: j for j in jobs}
        self.arrivals = sorted(jobs, key=lambda j: (j.arrival_s, j.id))
        self.queued: dict[str, SimJob] = {}
        self.running: dict[str, Running] = {}
        self.ledger = Ledger()
        self.now_s = 0.0
        #: (start, end, job) of every finished stretch of running (for usage curves).
        self.used: list[tuple[float, float, SimJob]] = []
        self.rounds = 0
        self._last_preempt: dict[str, float] = {}
        self._events: list[tuple[float, int, str, str]] = []
        self._seq = 0
        self._arrived = 0  # arrivals queued so far

    def at(self, s: float) -> datetime:
        return T0 + timedelta(seconds=s)

    def _push(self, t: float, kind: str, job_id: str) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, job_id))

    # -- the round, as the controller runs it ----------------------------------------------

    def _holds(self) -> list[Hold]:
        now = self.at(self.now_s)
        out = []
        for r in self.running.values():
            j = r.job
            left = r.overhead_s + j.remaining_s - (self.now_s - r.start_s)
            preempt = self._last_preempt.get(j.id)
            out.append(
                Hold(
                    j.id, j.owner, r.node, j.gpus, 1, None, j.priority, self.at(r.start_s),
                    now + timedelta(seconds=max(0.0, left)),
                    None if preempt is None else self.at(preempt),
                    r.preempt_at_s is not None, j.nodes, r.gang,
                )
            )  # fmt: skip
        return out

    def round(self) -> Round:
        """One scheduling round at `now_s`, its decisions applied."""
        self.rounds += 1
        now = self.at(self.now_s)
        holds = self._holds()
        nodes = node_views(self.totals, holds)
        fair = factors(self.ledger, holds, self.shares, now, self.halflife_s)
        rnd = Round(nodes, holds, self.policy, now, fair=fair, shares=self.shares)
        rnd.offer(
            [
                Candidate(j.id, j.owner, j.priority, self.at(j.arrival_s), j.gpus, None, 1,
                          None, j.est_s if j.est_s is not None else j.remaining_s,
                          nodes=j.nodes)
                for j in self._class_heads()
            ]
        )  # fmt: skip
        for p in rnd.plan.placements:
            gang = tuple((p.data or {}).get("gang_nodes") or ())
            self._start(self.queued.pop(p.job_id), p.node_id, gang)
        for d in rnd.preempt.decisions:
            for victim in d.victims:
                r = self.running[victim]
                r.preempt_at_s = self.now_s
                self._last_preempt[victim] = self.now_s
                r.job.preemptions.append(self.now_s)
                self._push(self.now_s + self.policy.checkpoint_s, "stop", victim)
        for res in rnd.reservations.values():
            due = (res.at - T0).total_seconds()
            self.jobs[res.job_id].reserved.append((self.now_s, due))
        return rnd

    def _class_heads(self) -> list[SimJob]:
        """The oldest `per_class` queued jobs of each (priority, owner, GPUs) class: what the
        queue reads for a round (`Scheduling.schedule`)."""
        classes: dict[tuple[int, str, float, int], list[SimJob]] = defaultdict(list)
        for j in self.queued.values():
            classes[(j.priority, j.owner, j.gpus, j.nodes)].append(j)
        out = []
        for js in classes.values():
            if len(js) > self.per_class:
                js = sorted(js, key=lambda j: (j.arrival_s, j.id))[: self.per_class]
            out += js
        return out

    def _start(self, job: SimJob, node: str, gang: tuple[str, ...] = ()) -> None:
        overhead = self.restart_s if job.starts else 0.0
        job.starts.append(self.now_s)
        if job.first_start_s is None:
            job.first_start_s = self.now_s
        self.running[job.id] = Running(job, node, self.now_s, overhead, gang=gang)
        self._push(self.now_s + overhead + job.remaining_s, "end", job.id)

    def _stop(self, job_id: str, finished: bool) -> None:
        r = self.running.pop(job_id)
        ran = self.now_s - r.start_s
        self.ledger.charge(r.job.owner, r.job.gpus * ran / 3600.0, self.at(self.now_s),
                           self.halflife_s)  # fmt: skip
        self.used.append((r.start_s, self.now_s, r.job))
        if finished:
            r.job.remaining_s, r.job.end_s = 0.0, self.now_s
        else:
            r.job.remaining_s = max(0.0, r.job.remaining_s - max(0.0, ran - r.overhead_s))
            self.queued[job_id] = r.job

    # -- the event loop ----------------------------------------------------------------------

    def run(self, until_s: float = float("inf")) -> None:
        """Run until every job has ended (or `until_s`)."""
        # Where the arrivals stand is kept across calls: `run(until_s=...)` is called again to
        # look at the cluster over time, and an arrival must not be queued twice.
        i = self._arrived
        while True:
            nxt = [self._events[0][0]] if self._events else []
            if i < len(self.arrivals):
                nxt.append(self.arrivals[i].arrival_s)
            if self.queued:
                nxt.append(self.now_s + self.tick_s)
            if not nxt:
                self._arrived = i
                return
            self.now_s = min(nxt)
            if self.now_s > until_s:
                self._arrived = i
                return
            while i < len(self.arrivals) and self.arrivals[i].arrival_s <= self.now_s:
                self.queued[self.arrivals[i].id] = self.arrivals[i]
                i += 1
            while self._events and self._events[0][0] <= self.now_s:
                _, _, kind, job_id = heapq.heappop(self._events)
                r = self.running.get(job_id)
                if r is None:
                    continue
                if kind == "end" and r.start_s + r.overhead_s + r.job.remaining_s <= self.now_s:
                    self._stop(job_id, finished=True)
                elif kind == "stop" and r.preempt_at_s is not None:
                    self._stop(job_id, finished=False)
            if self.queued:
                self.round()

    # -- measures ------------------------------------------------------------------------------

    def gpu_seconds(
        self, start_s: float, end_s: float, by: Callable[[SimJob], Any] = lambda j: j.owner
    ) -> dict[Any, float]:
        """GPU-seconds run within [start_s, end_s] per `by(job)` (default: per owner)."""
        out: dict[Any, float] = defaultdict(float)
        stretches = [*self.used, *((r.start_s, self.now_s, r.job) for r in self.running.values())]
        for a, b, job in stretches:
            overlap = min(b, end_s) - max(a, start_s)
            if overlap > 0:
                out[by(job)] += job.gpus * overlap
        return dict(out)
