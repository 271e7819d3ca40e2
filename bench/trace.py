"""Benchmark: the scheduling policy on a trace of 1,000 jobs, with simulated time.

Not a test. The real scheduling round (`scheduler.Round`: priority, fair share, fit,
preemption, reservation and backfill) is driven by `tests.plugins.simsched.Sim` — no Ray, no
training, no database — on a simulated cluster of 4 nodes x 8 GPUs (32 GPUs). The trace
(seeded): 1,000 jobs, 90% 1-GPU and 10% 8-GPU, four owners with shares 1:1:2:4 submitting
alike, priorities 0 / 1 / 2 (60 / 30 / 10%), run times log-normal (1-GPU median 1 h, 8-GPU
median 1.5 h). The priority 0 jobs (a `--burst` fraction of them, default all) are submitted in
the first minute: a backlog; the rest, the priority 1 jobs and the urgent priority 2 ones arrive
uniformly over a window sized so that demand is `--load` x what the cluster can run. The scheduler is told each job's run time with log-normal noise
(sigma 0.25: steps x measured seconds per step is an estimate); running jobs' ends are known
from their progress. Preempted jobs stop `checkpoint_s` after the notice keeping their work and
lose `restart_s` when they start again. 8-GPU jobs are gangs (Ray Train); they preempt and
are preempted as whole gangs (`orchestrator/preemption.py`).

Reported:
- makespan vs the lower bound max(total GPU-seconds / 32, latest arrival + run time); goal <= 1.10
- p95 wait (first start - arrival) of priority 2; goal <= min runtime window + one checkpoint
- each owner's GPU-hours vs its share over the time all four are backlogged (from the first
  moment all have jobs queued to the first moment one has none): the largest relative error
  (goal <= 10%) and Jain's index of GPU-hours / share (goal >= 0.95). Fair share orders jobs
  within a priority, so an owner's priority 1 and 2 work runs first whatever its share; where
  that alone is more than the share, no scheduler of this policy meets the goal. Also
  reported: each owner's error against what is attainable (`attainable`: its share, or its
  urgent work where that is more, the rest split by share), which is what the policy controls
- the longest wait of an 8-GPU job (goal: bounded). The bound stated: its owner's work ranked
  before it (higher priority submitted before it started, its own priority submitted before
  it, itself) divided by the owner's share of the 32 GPUs, plus the other owners' higher
  priority work submitted before it started divided by the 32 GPUs, plus one node drain (the
  longest job in the trace); reported as the largest wait / bound over the 8-GPU jobs
- scheduling decisions per second with 10,000 queued jobs: `bench/scheduler.py`'s measure of
  the controller's whole dispatch phase on SQLite (goal >= 2,000), unless `--no-throughput`

    .venv/bin/python bench/trace.py [--seed 0] [--jobs 1000] [--aging-s 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lorajobs.orchestrator.fairshare import Shares  # noqa: E402
from lorajobs.orchestrator.scheduler import Policy  # noqa: E402
from tests.plugins.simsched import Sim, SimJob  # noqa: E402

OWNERS = {"o1": 1.0, "o2": 1.0, "o3": 2.0, "o4": 4.0}
GPUS, NODES = 32, 4


def make_trace(n: int, seed: int, burst: float, load: float) -> list[SimJob]:
    """`n` jobs: a backlog of priority 0 work (a `burst` fraction of it submitted at once,
    the rest arriving over the window), and urgent priority 2 jobs arriving throughout."""
    rng = random.Random(seed)
    specs = []
    for _ in range(n):
        gpus = 8 if rng.random() < 0.10 else 1
        median = 5400.0 if gpus == 8 else 3600.0
        work = median * math.exp(rng.gauss(0.0, 0.5))
        prio = rng.choices([0, 1, 2], weights=[60, 30, 10])[0]
        owner = rng.choice(sorted(OWNERS))
        specs.append((gpus, work, prio, owner))
    total = sum(g * w for g, w, _, _ in specs)
    # The window is sized so that demand is `load` x capacity over it.
    window = total / GPUS / load
    jobs = []
    for i, (gpus, work, prio, owner) in enumerate(specs):
        est = work * math.exp(rng.gauss(0.0, 0.25))
        at_once = prio == 0 and rng.random() < burst
        arrival = rng.uniform(0.0, 60.0) if at_once else rng.uniform(0.0, window)
        jobs.append(SimJob(f"j{i:04d}", owner, prio, gpus, arrival, work, est_s=est))
    return jobs


def jain(xs: list[float]) -> float:
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))


def attainable(total: float, floors: dict[str, float]) -> dict[str, float]:
    """What each owner can get of `total` GPU-hours under strict priority: its share, unless its
    higher-priority work alone (`floors`, which runs first whatever the shares) is more; what
    is left is split among the others by share (water-filling)."""
    target: dict[str, float] = {}
    left, rest = total, dict(OWNERS)
    while rest:
        over = {o for o, s in rest.items() if floors.get(o, 0.0) > left * s / sum(rest.values())}
        if not over:
            break
        for o in over:
            target[o] = floors[o]
            left -= floors[o]
            del rest[o]
    weight = sum(rest.values())
    target.update({o: left * s / weight for o, s in rest.items()})
    return target


def backlogged(sim: Sim, jobs: list[SimJob]) -> tuple[float, float]:
    """[start, end] in which every owner had a 1-GPU job queued: work that could start on any
    GPU that frees up (an owner whose only queued job is an 8-GPU one waiting for its
    reservation cannot use a free GPU, so it is not backlogged in the fair-share sense)."""
    events = []
    for j in jobs:
        if j.gpus != 1:
            continue
        for k, start in enumerate(j.starts):
            queued_from = j.arrival_s if k == 0 else j.preemptions[k - 1] + sim.policy.checkpoint_s
            events.append((queued_from, +1, j.owner))
            events.append((start, -1, j.owner))
    events.sort(key=lambda e: (e[0], -e[1]))
    waiting = {o: 0 for o in OWNERS}
    start = end = None
    for t, d, owner in events:
        waiting[owner] += d
        every = all(v > 0 for v in waiting.values())
        if every and start is None:
            start = t
        elif not every and start is not None:
            end = t
            break
    assert start is not None and end is not None, "the owners were never all backlogged"
    return start, end


def owner_shares(sim: Sim, start: float, end: float) -> tuple[dict[str, dict[str, float]], float]:
    """Each owner's GPU-hours in [start, end] against its share and against what strict
    priority leaves attainable; Jain's index of GPU-hours / share."""
    used = sim.gpu_seconds(start, end)
    total_share = sum(OWNERS.values())
    total_used = sum(used.values())
    per_owner = {}
    for o, share in OWNERS.items():
        got = used.get(o, 0.0) / total_used
        want = share / total_share
        per_owner[o] = {
            "gpu_hours": round(used.get(o, 0.0) / 3600, 1),
            "fraction": round(got, 4),
            "share_fraction": round(want, 4),
            "rel_error": round(got / want - 1, 4),
        }
    jain_index = jain([used.get(o, 0.0) / s for o, s in OWNERS.items()])
    # Fair share orders jobs within a priority: an owner's priority 1 and 2 work runs first
    # whatever its share, so where that alone exceeds the share the goal is out of reach.
    urgent = sim.gpu_seconds(start, end, by=lambda j: (j.owner, j.priority > 0))
    reach = attainable(total_used, {o: urgent.get((o, True), 0.0) for o in OWNERS})
    for o, row in per_owner.items():
        row["urgent_gpu_hours"] = round(urgent.get((o, True), 0.0) / 3600, 1)
        row["attainable_fraction"] = round(reach[o] / total_used, 4)
        row["rel_error_vs_attainable"] = round(used.get(o, 0.0) / reach[o] - 1, 4)
    return per_owner, jain_index


def eight_gpu_waits(jobs: list[SimJob]) -> dict[str, Any]:
    """How long the 8-GPU jobs waited, against the bound stated in the module's docstring,
    and per priority against the 1-GPU jobs' longest waits."""
    total_share = sum(OWNERS.values())
    big = [j for j in jobs if j.gpus == 8]
    big_waits = [j.first_start_s - j.arrival_s for j in big]  # type: ignore[operator]
    small_max = {
        p: max(j.first_start_s - j.arrival_s for j in jobs if j.gpus == 1 and j.priority == p)  # type: ignore[operator]
        for p in (0, 1, 2)
    }
    big_max = {
        p: max((j.first_start_s - j.arrival_s for j in big if j.priority == p), default=0.0)  # type: ignore[operator]
        for p in (0, 1, 2)
    }
    worst = max(big, key=lambda j: j.first_start_s - j.arrival_s)  # type: ignore[operator]
    longest_1gpu = max(j.work_s for j in jobs if j.gpus == 1)
    # The bound on an 8-GPU job's wait: its owner's work ranked before it (higher priority,
    # any time before it started; its priority, submitted before it; itself) run at the owner's
    # share of the cluster, plus one drain of a node for it (the longest job of the trace).
    longest = max(j.work_s for j in jobs)

    def bound_s(big_job: SimJob) -> float:
        share = OWNERS[big_job.owner] / total_share * GPUS
        ahead = sum(
            j.gpus * j.work_s
            for j in jobs
            if j.owner == big_job.owner
            and (
                (j.priority > big_job.priority and j.arrival_s <= big_job.first_start_s)  # type: ignore[operator]
                or (j.priority == big_job.priority and j.arrival_s <= big_job.arrival_s)
            )
        )
        # Higher priority work of the other owners goes first whatever the shares.
        above = sum(
            j.gpus * j.work_s
            for j in jobs
            if j.owner != big_job.owner
            and j.priority > big_job.priority
            and j.arrival_s <= big_job.first_start_s  # type: ignore[operator]
        )
        return ahead / share + above / GPUS + longest

    ratios = [(j.first_start_s - j.arrival_s) / bound_s(j) for j in big]  # type: ignore[operator]
    return {
        "eight_gpu_jobs": len(big),
        "eight_gpu_max_wait_h": round(max(big_waits) / 3600, 2),
        "eight_gpu_median_wait_h": round(sorted(big_waits)[len(big_waits) // 2] / 3600, 2),
        "eight_gpu_worst": {
            "id": worst.id,
            "owner": worst.owner,
            "priority": worst.priority,
            "wait_h": round((worst.first_start_s - worst.arrival_s) / 3600, 2),  # type: ignore[operator]
            "bound_h": round(bound_s(worst) / 3600, 2),
        },
        "eight_gpu_max_wait_over_bound": round(max(ratios), 3),
        # Not starved: per priority, the longest wait of an 8-GPU job vs of a 1-GPU job.
        "max_wait_h_by_priority": {
            p: {"8gpu": round(big_max[p] / 3600, 2), "1gpu": round(small_max[p] / 3600, 2)}
            for p in (0, 1, 2)
        },
        "longest_1gpu_job_h": round(longest_1gpu / 3600, 2),
    }


def simulate(args: argparse.Namespace) -> dict[str, Any]:
    jobs = make_trace(args.jobs, args.seed, args.burst, args.load)
    policy = Policy(
        aging_s=args.aging_s,
        preempt_margin=1,
        min_runtime_s=args.min_runtime_s,
        checkpoint_s=args.checkpoint_s,
        backfill_safety=args.safety,
    )
    sim = Sim(
        jobs, policy, nodes=NODES, gpus_per_node=GPUS // NODES, shares=Shares(per_owner=OWNERS),
        restart_s=args.restart_s, tick_s=args.tick_s,
    )  # fmt: skip
    t = time.perf_counter()
    sim.run()
    wall = time.perf_counter() - t
    assert all(j.end_s is not None for j in jobs), "not every job ended"
    first = min(j.arrival_s for j in jobs)
    makespan = max(j.end_s for j in jobs) - first  # type: ignore[type-var]
    bound = (
        max(sum(j.gpus * j.work_s for j in jobs) / GPUS, max(j.arrival_s + j.work_s for j in jobs))
        - first
    )
    waits = sorted(j.first_start_s - j.arrival_s for j in jobs if j.priority == 2)  # type: ignore[operator]
    p95 = waits[min(len(waits) - 1, math.ceil(0.95 * len(waits)) - 1)]
    start, end = backlogged(sim, jobs)
    per_owner, jain_index = owner_shares(sim, start, end)
    big = eight_gpu_waits(jobs)
    preempted = [j for j in jobs if j.preemptions]
    return {
        "jobs": len(jobs),
        "gpus": GPUS,
        "policy": {
            "aging_s": args.aging_s,
            "min_runtime_s": args.min_runtime_s,
            "checkpoint_s": args.checkpoint_s,
            "backfill_safety": args.safety,
            "preempt_margin": 1,
        },
        "sim_wall_s": round(wall, 2),
        "rounds": sim.rounds,
        "makespan_h": round(makespan / 3600, 2),
        "lower_bound_h": round(bound / 3600, 2),
        "makespan_vs_bound": round(makespan / bound, 4),
        "top_priority_jobs": len(waits),
        "top_priority_p95_wait_s": round(p95, 1),
        "top_priority_max_wait_s": round(waits[-1], 1),
        "top_priority_goal_s": args.min_runtime_s + args.checkpoint_s,
        "backlogged_h": [round(start / 3600, 2), round(end / 3600, 2)],
        "owners_while_backlogged": per_owner,
        "owners_max_rel_error": round(max(abs(v["rel_error"]) for v in per_owner.values()), 4),
        "owners_max_rel_error_vs_attainable": round(
            max(abs(v["rel_error_vs_attainable"]) for v in per_owner.values()), 4
        ),
        "jain_index": round(jain_index, 4),
        **big,
        "preempted_jobs": len(preempted),
        "preemptions": sum(len(j.preemptions) for j in jobs),
        "preempted_twice_within_window": sum(
            1
            for j in jobs
            for a, b in zip(j.preemptions, j.preemptions[1:])
            if b - a < args.min_runtime_s
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--burst", type=float, default=1.0)
    ap.add_argument("--load", type=float, default=1.3)
    ap.add_argument("--aging-s", type=float, default=0.0)
    ap.add_argument("--min-runtime-s", type=float, default=600.0)
    ap.add_argument("--checkpoint-s", type=float, default=60.0)
    ap.add_argument("--restart-s", type=float, default=30.0)
    ap.add_argument("--safety", type=float, default=1.5)
    ap.add_argument("--tick-s", type=float, default=60.0)
    ap.add_argument("--no-throughput", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    result = simulate(args)
    print(json.dumps(result, indent=2), flush=True)
    if not args.no_throughput:
        from bench.scheduler import run

        with tempfile.TemporaryDirectory(prefix="ljtrace-") as tmp:
            result["throughput"] = run(f"sqlite:///{tmp}/bench.db", 10_000)
        print(json.dumps(result["throughput"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
