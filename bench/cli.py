"""Benchmark: how fast the CLI answers — `lorajobs status` with 10,000 jobs, and `lorajobs --help`.

Not a test. Each command runs as a real subprocess (the console script, as users run it), five
times after one warm-up; the median wall time is printed against its goal and against a
baseline measured in the same run: a bare `python -c "import typer"`, the least any Typer CLI
pays to start. The queue is SQLite in a temp LORAJOBS_HOME, filled in bulk as the scheduler
benchmark fills it.

    .venv/bin/python bench/cli.py [--jobs 10000] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from scheduler import fill  # noqa: E402

from lorajobs.orchestrator.cli.context import open_queue  # noqa: E402
from lorajobs.orchestrator.settings import Settings  # noqa: E402

GOALS = {"status": 0.5, "--help": 0.3}


def timed(argv: list[str], env: dict[str, str], runs: int) -> float:
    """Median wall seconds of `argv` over `runs` runs, after one warm-up run."""
    subprocess.run(argv, env=env, capture_output=True, check=True)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    lorajobs = str(Path(sys.executable).with_name("lorajobs"))
    with tempfile.TemporaryDirectory(prefix="lorajobs-bench-cli-") as home:
        env = {**os.environ, "LORAJOBS_HOME": home}
        os.environ["LORAJOBS_HOME"] = home
        fill(open_queue(Settings.from_env()), args.jobs)
        baseline = timed([sys.executable, "-c", "import typer"], env, args.runs)
        print(f"baseline (python -c 'import typer'): {baseline:.3f} s")
        for name, argv in (("status", [lorajobs, "status"]), ("--help", [lorajobs, "--help"])):
            t = timed(argv, env, args.runs)
            verdict = "ok" if t <= GOALS[name] else "OVER GOAL"
            print(
                f"lorajobs {name:<7} {t:.3f} s  goal <= {GOALS[name]} s ({verdict})  "
                f"{t / baseline:.2f}x baseline  [{args.jobs} jobs]"
            )


if __name__ == "__main__":
    main()
