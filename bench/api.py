"""Benchmark: the HTTP API and the dashboard with 10,000 jobs in PostgreSQL.

Not a test. A throwaway PostgreSQL server (Debian's binaries, as the tests use) is filled with
10,000 jobs of 20 owners, and `lorajobs server` is started on it. Measured, each against a
baseline run in the same script:

1. the first page of the queue (`GET /v1/jobs?limit=50`): the median time inside the server
   (its `Server-Timing` header) and at the client, for an admin and for one owner's member,
   against the same `Queue.list` + wait reasons called in this process (goal: <= 50 ms);
2. 8 clients submitting while 50 poll the queue (every 2 s, as the dashboard and `status
   --watch` do) for `--seconds`: submits/s and errors, against 8 threads calling `Queue.submit`
   directly (goal: >= 200 submits/s, no errors); and, for the record, the same with the 50
   polling as fast as they can;
3. the dashboard's queue page in Chromium: from navigation to the table's rows drawn, against
   the plain `GET /v1/jobs?limit=100` it makes (goal: <= 1 s).

    .venv/bin/python bench/api.py [--jobs 10000] [--seconds 10] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from scheduler import fill  # noqa: E402

from lorajobs.jobspecs import parse_spec  # noqa: E402
from lorajobs.orchestrator import waiting  # noqa: E402
from lorajobs.orchestrator.db import ensure_schema, make_engine  # noqa: E402
from lorajobs.orchestrator.queue import Queue  # noqa: E402
from lorajobs.orchestrator.tokens import Tokens  # noqa: E402
from tests.plugins.postgres import _free_port, find_pg_bin, start_server, stop_server  # noqa: E402

#: How often a poller asks: what the dashboard and `lorajobs status --watch` do.
POLL_EVERY_S = 2.0
SPEC = {
    "kind": "text",
    "name": "bench-submit",
    "base_model": "{root}/models/m",
    "dataset": "{root}/datasets/d",
    "training": {"steps": 100},
    "resources": {"gpus": 1},
}


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def first_page(url: str, token: str, runs: int) -> tuple[float, float]:
    """(median ms inside the server, median ms at the client) of the queue's first page."""
    inside, outside = [], []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as c:
        c.get("/v1/jobs", params={"limit": 50})
        for _ in range(runs):
            t0 = time.perf_counter()
            r = c.get("/v1/jobs", params={"limit": 50})
            outside.append(time.perf_counter() - t0)
            r.raise_for_status()
            inside.append(float(r.headers["server-timing"].split("dur=")[1]) / 1000)
    return median_ms(inside), median_ms(outside)


def direct_page(queue: Queue, runs: int, owner: str | None = None) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jobs = queue.list(owner=owner, limit=50)
        summary, now = queue.scheduling.waiting(), queue.clock()
        _ = [waiting.reason(j, summary, now) for j in jobs]
        times.append(time.perf_counter() - t0)
    return median_ms(times)


def load(
    url: str,
    submitters: list[tuple[str, str]],
    pollers: list[str],
    seconds: float,
    every_s: float = POLL_EVERY_S,
) -> dict:
    """Submits/s and polls/s with `len(submitters)` submitting as fast as they can and
    `len(pollers)` polling every `every_s` (0: as fast as they can)."""
    stop = threading.Event()
    counts = {"submits": 0, "polls": 0, "errors": 0}
    lock = threading.Lock()

    def submitter(token: str, root: str) -> None:
        spec = {k: (v.format(root=root) if isinstance(v, str) else v) for k, v in SPEC.items()}
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as c:
            while not stop.is_set():
                r = c.post("/v1/jobs", json={"spec": spec})
                with lock:
                    counts["submits" if r.status_code == 201 else "errors"] += 1

    def poller(token: str) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as c:
            while not stop.is_set():
                r = c.get("/v1/jobs", params={"limit": 50})
                with lock:
                    counts["polls" if r.status_code == 200 else "errors"] += 1
                stop.wait(every_s)

    threads = [threading.Thread(target=submitter, args=s) for s in submitters]
    threads += [threading.Thread(target=poller, args=(p,)) for p in pollers]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return {k: v / seconds if k != "errors" else v for k, v in counts.items()}


def direct_submits(queue: Queue, bucket: str, seconds: float, threads: int = 8) -> float:
    stop, done = threading.Event(), [0]
    lock = threading.Lock()
    root = f"{bucket}/owners/owner-00"
    spec = parse_spec(
        {k: (v.format(root=root) if isinstance(v, str) else v) for k, v in SPEC.items()}
    )

    def run() -> None:
        while not stop.is_set():
            queue.submit(spec, output_uri=root)
            with lock:
                done[0] += 1

    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in ts:
        t.join()
    return done[0] / seconds


def dashboard_ms(url: str, token: str, runs: int) -> tuple[float, float]:
    """(median ms to the queue page's rows in Chromium, median ms of its API call)."""
    from playwright.sync_api import sync_playwright

    from tests.e2e.test_dashboard import CHROMIUM_ARGS, chromium_path

    page_times, api_times = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(url + "/login")
        page.fill("#token", token)
        page.click("#signin")
        page.wait_for_selector("#jobs tbody tr")
        for _ in range(runs):
            t0 = time.perf_counter()
            page.goto(url + "/")
            page.wait_for_selector("#jobs tbody tr")
            page_times.append(time.perf_counter() - t0)
        browser.close()
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as c:
        for _ in range(runs):
            t0 = time.perf_counter()
            c.get("/v1/jobs", params={"limit": 100}).raise_for_status()
            api_times.append(time.perf_counter() - t0)
    return median_ms(page_times), median_ms(api_times)


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED GOAL"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2, help="server processes")
    args = ap.parse_args()
    bin_dir = find_pg_bin()
    if bin_dir is None:
        sys.exit("no PostgreSQL server binaries (infra/local/ensure-postgres.sh)")
    pg = start_server(bin_dir)
    server = None
    try:
        db = pg.create_database("bench")
        engine = make_engine(db)
        ensure_schema(engine, auto=True)
        queue = Queue(engine)
        fill(queue, args.jobs)
        home = Path(tempfile.mkdtemp(prefix="lorajobs-bench-api-"))
        bucket = f"file://{home / 'bucket'}"
        tokens = Tokens(engine, queue.clock)
        admin = tokens.create("ops", "admin")[0]
        members = [
            (tokens.create(f"owner-{i:02d}", "member")[0], f"{bucket}/owners/owner-{i:02d}")
            for i in range(8)
        ]
        port = _free_port()
        env = {
            **os.environ,
            "LORAJOBS_HOME": str(home),
            "LORAJOBS_DATABASE_URL": db,
            "LORAJOBS_BUCKET": bucket,
            "LORAJOBS_BAD_TOKENS_PER_MINUTE": "100000",
        }
        lorajobs = str(Path(sys.executable).with_name("lorajobs"))
        server = subprocess.Popen(
            [lorajobs, "server", "--port", str(port), "--workers", str(args.workers)], env=env
        )
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            if server.poll() is not None:
                sys.exit("the server did not start")
            try:
                if httpx.get(url + "/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        print(f"{args.jobs} jobs in PostgreSQL; lorajobs server with {args.workers} worker(s)")

        base = direct_page(queue, args.runs)
        for who, token in (("admin", admin), ("member", members[0][0])):
            inside, outside = first_page(url, token, args.runs)
            print(
                f"first page ({who}): {inside:.1f} ms in the server, {outside:.1f} ms at the "
                f"client; in-process Queue.list {base:.1f} ms (x{inside / base:.2f}); goal "
                f"<= 50 ms: {verdict(inside <= 50)}"
            )

        pollers = [admin] * 25 + [m for m, _ in members] * 3 + [admin]
        flood = load(url, members, pollers, args.seconds, every_s=0.0)
        print(
            f"(50 polling as fast as they can: {flood['submits']:.0f} submits/s, "
            f"{flood['polls']:.0f} polls/s, {flood['errors']} errors)"
        )
        got = load(url, members, pollers, args.seconds)
        direct = direct_submits(queue, bucket, min(args.seconds, 5.0))
        print(
            f"8 submitting + 50 polling every {POLL_EVERY_S:g} s: {got['submits']:.0f} submits/s, {got['polls']:.0f} "
            f"polls/s, {got['errors']} errors; direct Queue.submit from 8 threads {direct:.0f}/s "
            f"(x{got['submits'] / direct:.2f}); goal >= 200/s, no errors: "
            f"{verdict(got['submits'] >= 200 and got['errors'] == 0)}"
        )

        page, api = dashboard_ms(url, admin, 10)
        print(
            f"dashboard queue page: {page:.0f} ms to its rows in Chromium; its API call alone "
            f"{api:.0f} ms (x{page / api:.1f}); goal <= 1000 ms: {verdict(page <= 1000)}"
        )
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        stop_server(pg, bin_dir)


if __name__ == "__main__":
    main()
