"""Benchmark: scheduler throughput — dispatch decisions per second with 10,000 queued jobs.

Not a test. A decision is one queued job placed on a node and moved to `dispatched` (its row
updated under compare-and-set, its event written, its attempt handed to the backend). What is
timed is the controller's whole dispatch phase (`Controller._dispatch`): the queued check, the
cluster view, the scheduling round in one transaction (holds, class heads, the policy, the bulk
claim) and the launches, with Ray replaced by a no-op backend so the figure is the control
plane's own. Jobs: 20 owners, priorities -5..5, five resource shapes (1 GPU of any type, 1 A100,
1 H100, a quarter GPU, CPU only); owner limits 300 jobs / 200 GPUs. Cluster: 200 nodes of 8 GPUs
(A100, H100, L4), 64 CPUs. Between rounds, what was dispatched is finished by plain SQL (not
timed) so capacity frees up; the queue stays above `--queued / 2` throughout.

    .venv/bin/python bench/scheduler.py [--queued 10000] [--pg] [--database-url URL] [--json F]

`--pg` starts a throwaway PostgreSQL server (Debian's binaries, as the tests do).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import insert, update  # noqa: E402

from lorajobs.jobspecs import parse_spec, spec_to_dict  # noqa: E402
from lorajobs.orchestrator.controller import Controller  # noqa: E402
from lorajobs.orchestrator.db import EVENTS, JOBS, ensure_schema, make_engine  # noqa: E402
from lorajobs.orchestrator.queue import Queue  # noqa: E402
from lorajobs.orchestrator.ray_backend import Attempt, ClusterView  # noqa: E402
from lorajobs.orchestrator.records import dump_json  # noqa: E402
from lorajobs.orchestrator.scheduler import OwnerLimits, Policy  # noqa: E402
from lorajobs.orchestrator.settings import ControllerConfig  # noqa: E402

SHAPES = [(1.0, None, 4), (1.0, "A100", 4), (1.0, "H100", 8), (0.25, None, 2), (0.0, None, 4)]


class NoRay:
    """The backend surface the controller uses, doing nothing (launches are free)."""

    local = False

    def __init__(self, nodes: int) -> None:
        types = ["A100", "H100", "L4"]
        self.totals = {
            f"node-{i:04d}": {
                "CPU": 64.0,
                "GPU": 8.0,
                f"accelerator_type:{types[i % 3]}": 1.0,
                "memory": 512 * 1024**3,
            }
            for i in range(nodes)
        }
        self.launched = 0

    def driver_id(self) -> str:
        return "bench/01000000"

    def driver_alive(self, driver: str) -> bool | None:
        return True

    def cluster(self) -> ClusterView:
        return ClusterView(self.totals, None)

    def draining(self) -> dict[str, Any]:
        return {}  # no node drains here

    def launch(
        self, job_id: str, attempt: int, *a: Any, node_id: str | None = None, **k: Any
    ) -> Attempt:
        self.launched += 1
        return Attempt(job_id, attempt, None, 0.0, node_id)

    def progress(self) -> dict[str, Any]:
        return {}

    def finished(self, attempts: list[Attempt]) -> list[Attempt]:
        return []

    def request_resources(self, bundles: list[dict[str, float]]) -> None:
        pass


def fill(queue: Queue, n: int, seed: int = 0) -> None:
    """Insert `n` queued jobs the way `Queue.submit` stores them, in bulk (setup, not timed)."""
    rng = random.Random(seed)
    base = spec_to_dict(
        parse_spec(
            {
                "kind": "text",
                "name": "bench",
                "base_model": "m",
                "dataset": "d",
                "training": {"steps": 100},
            }
        )
    )
    t0 = datetime.now(timezone.utc) - timedelta(hours=1)
    rows, events = [], []
    for i in range(n):
        gpus, gpu_type, cpus = SHAPES[rng.randrange(len(SHAPES))]
        owner, prio = f"owner-{rng.randrange(20):02d}", rng.randint(-5, 5)
        spec = {
            **base,
            "owner": owner,
            "priority": prio,
            "name": f"job-{i}",
            "resources": {"gpus": gpus, "gpu_type": gpu_type, "cpus": cpus, "memory_gb": None},
        }
        at = t0 + timedelta(milliseconds=i)
        jid = f"{i:012x}"
        rows.append(
            dict(
                id=jid,
                name=f"job-{i}",
                kind="text",
                owner=owner,
                priority=prio,
                status="queued",
                spec=dump_json(spec),
                output_uri="file:///b",
                attempt=1,
                gpus=gpus,
                gpu_type=gpu_type,
                cpus=cpus,
                created_at=at,
                updated_at=at,
                cancel_requested=False,
            )
        )
        events.append(
            dict(job_id=jid, at=at, from_status=None, to_status="queued", reason="submitted")
        )
    with queue.engine.begin() as conn:
        for start in range(0, n, 2000):
            conn.execute(insert(JOBS), rows[start : start + 2000])
            conn.execute(insert(EVENTS), events[start : start + 2000])


def finish_dispatched(queue: Queue) -> None:
    jobs = JOBS
    with queue.engine.begin() as conn:
        conn.execute(
            update(jobs)
            .where(jobs.c.status == "dispatched")
            .values(status="succeeded", lease_owner=None)
        )


def run(url: str, queued: int) -> dict[str, Any]:
    engine = make_engine(url)
    ensure_schema(engine, auto=True)
    queue = Queue(engine)
    fill(queue, queued)
    config = ControllerConfig(
        policy=Policy(aging_s=600, limits=OwnerLimits(max_jobs=300, max_gpus=200))
    )
    backend = NoRay(200)
    ctl = Controller(queue, backend, config)  # type: ignore[arg-type]
    rounds: list[tuple[int, float]] = []
    total_t, total_n = 0.0, 0
    while total_n < queued // 2:
        before = backend.launched
        t = time.perf_counter()
        ctl._dispatch()
        dt = time.perf_counter() - t
        n = backend.launched - before
        if n == 0:
            break
        rounds.append((n, dt))
        total_t += dt
        total_n += n
        ctl.inflight.clear()
        finish_dispatched(queue)
    # The idle cost: a full round that finds nothing to place (every node busy).
    saved = backend.totals
    backend.totals = {k: {**v, "GPU": 0.0, "CPU": 0.0} for k, v in saved.items()}
    t = time.perf_counter()
    for _ in range(5):
        ctl._dispatch()
    idle_ms = (time.perf_counter() - t) / 5 * 1000
    engine.dispose()
    per_round = [n / dt for n, dt in rounds]
    return {
        "database": engine.dialect.name,
        "queued_at_start": queued,
        "decisions": total_n,
        "rounds": len(rounds),
        "decisions_per_s": round(total_n / total_t, 1),
        "median_round_decisions_per_s": round(statistics.median(per_round), 1),
        "median_round_ms": round(statistics.median(dt for _, dt in rounds) * 1000, 1),
        "idle_round_ms": round(idle_ms, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queued", type=int, default=10_000)
    ap.add_argument("--pg", action="store_true", help="also on a throwaway PostgreSQL server")
    ap.add_argument("--database-url", help="also on this (empty) database")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="ljbench-") as tmp:
        results.append(run(f"sqlite:///{tmp}/bench.db", args.queued))
        print(json.dumps(results[-1]), flush=True)
    if args.database_url:
        results.append(run(args.database_url, args.queued))
        print(json.dumps(results[-1]), flush=True)
    if args.pg:
        from tests.plugins.postgres import find_pg_bin, start_server, stop_server

        bin_dir = find_pg_bin()
        if bin_dir is None:
            sys.exit("no PostgreSQL server binaries (infra/local/ensure-postgres.sh)")
        server = start_server(bin_dir)
        try:
            results.append(run(server.create_database("bench"), args.queued))
            print(json.dumps(results[-1]), flush=True)
        finally:
            stop_server(server, bin_dir)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
