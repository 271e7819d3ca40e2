"""Benchmark: latency from `submit` to the first training step, and from the last step to
`succeeded` being visible in the database (what `lorajobs status` reads).

Not a test. A simulated cluster (head + one logical-GPU node, as in bench/makespan.py) and a
controller already running (default settings, in a thread of this process). Jobs are submitted
one at a time, each after the previous one succeeded; the first one finds no worker process
on the node (cold: process start + imports), the others reuse it (warm).

Times come from one clock (one machine): `submit` is the job's `created_at`; the first and the
last training step are read from the worker's own log in the bucket (millisecond timestamps on
its progress lines; the first line is the trainer's first report, about 0.5 s into training,
so the first step itself is estimated as that time minus (step - 1) / it/s); `succeeded
visible` is the time of the `succeeded` event, written in the same transaction as the status.

    .venv/bin/python bench/latency.py [--jobs 6] [--steps 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.makespan import controller_for, start_cluster, text_spec, tiny_inputs  # noqa: E402

STEP_LINE = re.compile(r"^(\S+ \S+) step (\d+)/(\d+)(?:\s+loss \S+)?(?:\s+([\d.]+) it/s)?")


def _ts(stamp: str) -> float:
    return (
        datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()
    )


def measure(job: Any, log: str) -> dict[str, float]:
    steps = [m for line in log.splitlines() if (m := STEP_LINE.match(line))]
    first, last = steps[0], steps[-1]
    t_first = _ts(first.group(1))
    k, speed = int(first.group(2)), float(first.group(4) or 0)
    t_first_step = t_first - ((k - 1) / speed if speed else 0.0)
    assert last.group(2) == last.group(3), "the last progress line is the last step"
    events = {e.to_status.value: e.at.timestamp() for e in job.events}
    submit = job.record.created_at.timestamp()
    return {
        "submit_to_dispatched_s": events["dispatched"] - submit,
        "submit_to_first_step_s": t_first_step - submit,
        "submit_to_first_report_s": t_first - submit,
        "last_step_to_succeeded_visible_s": events["succeeded"] - _ts(last.group(1)),
        "export_s": job.record.result["timings"].get("export") or 0.0,
        "upload_s": job.record.result["timings"].get("upload") or 0.0,
    }


class _Job:
    def __init__(self, record: Any, events: Any) -> None:
        self.record, self.events = record, events


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from lorajobs.orchestrator.db import make_engine
    from lorajobs.orchestrator.queue import Queue
    from lorajobs.storage.logs import read_log

    work = Path(tempfile.mkdtemp(prefix="ljbench-latency-"))
    cluster, _, ray_tmp = start_cluster(1)
    stop = threading.Event()
    try:
        model, data = tiny_inputs(work)
        _, ctl = controller_for(cluster.address, work / "home")
        runner = threading.Thread(target=ctl.run, kwargs={"until": stop.is_set}, daemon=True)
        runner.start()
        queue = Queue(make_engine(f"sqlite:///{work / 'home' / 'lorajobs.db'}"))
        bucket = f"file://{work / 'bucket'}"
        rows = []
        for i in range(args.jobs):
            job, _ = queue.submit(text_spec(f"lat-{i}", model, data, args.steps), output_uri=bucket)
            while not queue.get(job.id).status.is_terminal():
                time.sleep(0.01)
            rec = queue.get(job.id)
            assert rec.status.value == "succeeded", rec.failure_reason
            log = (read_log(bucket, rec.id, rec.attempt) or b"").decode()
            rows.append(measure(_Job(rec, queue.events(rec.id)), log))
            print(
                json.dumps({"job": i, **{k: round(v, 3) for k, v in rows[-1].items()}}), flush=True
            )
        warm = rows[1:] or rows
        summary = {
            "cold": {k: round(v, 3) for k, v in rows[0].items()},
            "warm_median": {k: round(statistics.median(r[k] for r in warm), 3) for k in rows[0]},
            "jobs": args.jobs,
            "steps": args.steps,
        }
        print(json.dumps(summary), flush=True)
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2))
    finally:
        stop.set()
        time.sleep(1.5)
        import ray

        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
