"""Benchmark: makespan of 24 short jobs on a simulated 2-GPU cluster against the ideal.

Not a test. A `ray.cluster_utils.Cluster` with a head (no CPUs) and two worker nodes of one
logical A100 each (training runs on the CPU, one thread); the controller runs in this process
with its default settings (poll 0.5 s) on a SQLite home; 24 tiny text jobs (the tiny Llama,
`--steps` each) are submitted at once.

    makespan = last job's `succeeded` - first submit
    ideal    = total work / GPUs

"Work" is measured two ways, both reported: (a) each attempt's wall time inside its Ray task
(`attempt_seconds`: pull from the node cache, model load, training, export, upload — imports
included on a worker's first job), the work a perfect scheduler still has to do; (b) each job's
dispatched -> succeeded span, which adds what a launch costs (task start, process start on a
node's first job). The ratio against (a) is the scheduler's overhead; against (b) the pure
queueing gaps.

    .venv/bin/python bench/makespan.py [--jobs 24] [--steps 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def start_cluster(gpu_nodes: int) -> tuple[Any, list[Any], str]:
    tmp = tempfile.mkdtemp(prefix="ljb-", dir="/tmp")
    os.environ.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="disabled",
        RAY_TMPDIR=tmp,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "num_gpus": 0,
            "include_dashboard": False,
            "object_store_memory": 80 * 1024**2,
        },
    )
    nodes = [
        cluster.add_node(
            num_cpus=1,
            num_gpus=1,
            resources={"accelerator_type:A100": 1},
            object_store_memory=80 * 1024**2,
        )
        for _ in range(gpu_nodes)
    ]
    cluster.wait_for_nodes()
    return cluster, nodes, tmp


def tiny_inputs(root: Path) -> tuple[Path, Path]:
    from lorajobs.worker.trainers.text.tiny import build_tiny_text_model, make_text_dataset

    model, data = root / "tiny-llama", root / "train.jsonl"
    if not model.exists():
        build_tiny_text_model(model, seed=0)
        make_text_dataset(data, n=64, seed=0)
    return model, data


def text_spec(name: str, model: Path, data: Path, steps: int) -> Any:
    from lorajobs.jobspecs import parse_spec

    return parse_spec(
        {
            "kind": "text",
            "name": name,
            "base_model": str(model),
            "dataset": str(data),
            "lora": {"rank": 4, "alpha": 8},
            "training": {
                "steps": steps,
                "batch_size": 2,
                "learning_rate": 1e-3,
                "seed": 0,
                "max_seq_length": 64,
            },
            "resources": {"gpus": 1, "cpus": 1},
        }
    )


def controller_for(address: str, home: Path, **config: Any) -> tuple[Any, Any]:
    from lorajobs.orchestrator.controller import Controller
    from lorajobs.orchestrator.db import ensure_schema, make_engine
    from lorajobs.orchestrator.queue import Queue
    from lorajobs.orchestrator.ray_backend import RayBackend
    from lorajobs.orchestrator.settings import ControllerConfig, Settings

    settings = Settings.from_env({"LORAJOBS_HOME": str(home), "LORAJOBS_RAY_ADDRESS": address})
    engine = make_engine(settings)
    ensure_schema(engine)
    queue = Queue(engine)
    base = ControllerConfig.from_env({})
    from dataclasses import replace

    return queue, Controller(queue, RayBackend(settings), replace(base, **config))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=24)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ljbench-makespan-"))
    cluster, _, ray_tmp = start_cluster(args.gpus)
    try:
        model, data = tiny_inputs(work)
        queue, ctl = controller_for(cluster.address, work / "home")
        bucket = f"file://{work / 'bucket'}"
        t0 = time.time()
        ids = [
            queue.submit(text_spec(f"job-{i}", model, data, args.steps), output_uri=bucket)[0].id
            for i in range(args.jobs)
        ]
        ctl.run(until=lambda: all(queue.get(i).status.is_terminal() for i in ids))
        jobs = [queue.get(i) for i in ids]
        assert all(j.status.value == "succeeded" for j in jobs), [j.failure_reason for j in jobs]
        makespan = max(j.finished_at.timestamp() for j in jobs) - t0
        in_task = sum(j.result["attempt_seconds"] for j in jobs)
        spans = sum((j.finished_at - j.dispatched_at).total_seconds() for j in jobs)
        train = sum(j.result["timings"]["train"] for j in jobs)
        gaps = []
        for node in {j.node_id for j in jobs}:
            mine = sorted((j for j in jobs if j.node_id == node), key=lambda j: j.dispatched_at)
            gaps += [
                (b.dispatched_at - a.finished_at).total_seconds() for a, b in zip(mine, mine[1:])
            ]
        first = min(j.dispatched_at.timestamp() for j in jobs) - t0
        out = {
            "jobs": args.jobs,
            "first_dispatch_s": round(first, 2),
            "mean_gap_between_jobs_on_a_node_s": round(sum(gaps) / max(1, len(gaps)), 3),
            "max_gap_s": round(max(gaps, default=0.0), 3),
            "gpus": args.gpus,
            "steps": args.steps,
            "makespan_s": round(makespan, 2),
            "ideal_s_in_task": round(in_task / args.gpus, 2),
            "ratio_vs_in_task_work": round(makespan / (in_task / args.gpus), 3),
            "ideal_s_dispatch_to_done": round(spans / args.gpus, 2),
            "ratio_vs_dispatch_to_done": round(makespan / (spans / args.gpus), 3),
            "ideal_s_train_only": round(train / args.gpus, 2),
            "ratio_vs_train_only": round(makespan / (train / args.gpus), 3),
            "mean_job_in_task_s": round(in_task / args.jobs, 2),
        }
        print(json.dumps(out), flush=True)
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
