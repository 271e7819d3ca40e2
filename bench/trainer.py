"""Benchmark: the lorajobs trainers against bare PyTorch + PEFT loops doing the same work.

Not a test. Each measurement runs in its own fresh process (so start-up and peak RSS are
honest), and the pairs are interleaved round by round so machine noise hits both alike:

1. per-step time, image and text: lorajobs `train()` vs a bare loop doing the same work, on
   the tests' tiny models (same LoRA, data, cached latents, AdamW without weight decay,
   clipping; text: the same batches in the same order, the same padding and masks, no KV
   cache — checked: the two loops' losses are equal bit for bit, `same_losses`); plus start-up
   time (process start to first step) and peak RSS of each;
2. a multi-epoch image job: lorajobs (VAE latents + text embeddings computed once) vs the bare
   loop that, every step, decodes its image files, resizes and crops them, VAE-encodes them and
   encodes the captions, as diffusers' training scripts do — whole-job wall and CPU time, and
   the steady-state per-step ratio. On a model with SD 1.5's proportions (bench/sd_proportions.py
   says why and how; `baseline_encode_share` is the share of the bare step the encoding took,
   ~0.39 for SD 1.5 at 512 px by FLOPs), and, for reference, on the tiny 64 px model (pair 7),
   where encoding is cheap and caching has little to save;
3. useful (non-padding) tokens per second on a variable-length text set: lorajobs (packed, and
   padded) vs `transformers.Trainer` + PEFT padding to max_length, and to the batch's longest;
4. Flux.1 on the tiny Flux pipeline (pairs 10-12; bench/flux_loops.py): per-step time of
   lorajobs vs a bare flow-matching loop doing the same work, and a multi-epoch job with cached
   latents + T5/CLIP prompt embeddings vs one that decodes and encodes every step.

Each side is timed over the same kind of window: from the first ~0.5 s progress report to the
last step (`Clock`). Read the CPU figures on a shared machine; wall time also measures the
neighbours.

    .venv/bin/python bench/trainer.py [--steps 300] [--text-steps 150] [--epochs 25]
        [--rounds 3] [--threads 1] [--only 1,2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

# Beside this file (bench/ is the script's folder). `loops` is imported first (flux_loops'
# first line imports it too): it notes the process start.
from flux_loops import bare_flux, lorajobs_flux
from loops import (
    alternating,
    bare_image,
    bare_text,
    hf_trainer_text,
    lorajobs_image,
    lorajobs_text,
)
from sd_proportions import BENCH_RESOLUTION, build_sd_proportioned_model

ROOT = Path(__file__).resolve().parents[1]


# -- fixtures (built once, shared by every worker process) ---------------------------------------


def build_fixtures(root: Path) -> dict[str, str]:
    from lorajobs.worker.trainers.image.flux_tiny import build_tiny_flux_model
    from lorajobs.worker.trainers.image.tiny import build_tiny_image_model, make_image_dataset
    from lorajobs.worker.trainers.text.tiny import (
        _sentence,
        build_tiny_text_model,
        make_text_dataset,
    )

    paths = {
        "image_model": root / "image-model",
        "image_data": root / "image-data",
        "text_model": root / "text-model",
        "text_data": root / "text.jsonl",
        "varlen_data": root / "varlen.jsonl",
        "sd_model": root / "sd-model",
        "sd_data": root / "sd-data",
        "flux_model": root / "flux-model",
    }
    if not paths["flux_model"].exists():
        build_tiny_flux_model(paths["flux_model"], seed=0)
    if not paths["sd_model"].exists():
        build_sd_proportioned_model(paths["sd_model"], seed=0)
        # Larger than the training resolution, as photos are: each step resizes and crops.
        make_image_dataset(paths["sd_data"], n=8, size=BENCH_RESOLUTION * 5 // 4, seed=0)
    if not paths["image_model"].exists():
        build_tiny_image_model(paths["image_model"], seed=0)
        make_image_dataset(paths["image_data"], n=8, size=64, seed=0)
        build_tiny_text_model(paths["text_model"], seed=0)
        make_text_dataset(paths["text_data"], n=64, seed=0)
        rng = random.Random(0)
        with open(paths["varlen_data"], "w", encoding="utf-8") as f:
            for _ in range(256):  # 1..24 sentences: ~8..250 tokens, a long-tailed mix
                n = min(24, max(1, int(rng.expovariate(1 / 5))))
                f.write(json.dumps({"text": " ".join(_sentence(rng) for _ in range(n))}) + "\n")
    return {k: str(v) for k, v in paths.items()}


WORKERS = {
    "lorajobs-image": lambda fx, a: lorajobs_image(fx, a.steps, a.threads, None),
    "bare-image": lambda fx, a: bare_image(fx, a.steps, a.threads, None),
    "lorajobs-image-epochs": lambda fx, a: lorajobs_image(fx, 0, a.threads, a.epochs, "sd"),
    "bare-image-encode-every-step": lambda fx, a: bare_image(
        fx, 0, a.threads, a.epochs, True, "sd"
    ),
    "lorajobs-image-epochs-tiny": lambda fx, a: lorajobs_image(fx, 0, a.threads, a.epochs),
    "bare-image-encode-every-step-tiny": lambda fx, a: bare_image(fx, 0, a.threads, a.epochs, True),
    "lorajobs-text": lambda fx, a: lorajobs_text(fx, a.steps, a.threads),
    "bare-text": lambda fx, a: bare_text(fx, a.steps, a.threads),
    "lorajobs-text-varlen-packed": lambda fx, a: lorajobs_text(
        fx, a.text_steps, a.threads, "varlen_data", 4, 256, True
    ),
    "lorajobs-text-varlen-padded": lambda fx, a: lorajobs_text(
        fx, a.text_steps, a.threads, "varlen_data", 4, 256, False
    ),
    "trainer-text-varlen-maxlen": lambda fx, a: hf_trainer_text(
        fx, a.text_steps, a.threads, "max_length"
    ),
    "trainer-text-varlen-longest": lambda fx, a: hf_trainer_text(
        fx, a.text_steps, a.threads, "longest"
    ),
    "lorajobs-flux": lambda fx, a: lorajobs_flux(fx, a.steps, a.threads, None),
    "bare-flux": lambda fx, a: bare_flux(fx, a.steps, a.threads, None),
    "lorajobs-flux-epochs": lambda fx, a: lorajobs_flux(fx, 0, a.threads, a.epochs),
    "bare-flux-encode-every-step": lambda fx, a: bare_flux(fx, 0, a.threads, a.epochs, True),
    "alternating-flux": lambda fx, a: alternating(
        lambda: lorajobs_flux(fx, a.steps, a.threads, None),
        lambda: bare_flux(fx, a.steps, a.threads, None),
        a.calls,
    ),
    "alternating-text": lambda fx, a: alternating(
        lambda: lorajobs_text(fx, a.steps, a.threads),
        lambda: bare_text(fx, a.steps, a.threads),
        a.calls,
    ),
    "alternating-image": lambda fx, a: alternating(
        lambda: lorajobs_image(fx, a.steps, a.threads, None),
        lambda: bare_image(fx, a.steps, a.threads, None),
        a.calls,
    ),
}

PAIRS = [
    ("per-step, image", "lorajobs-image", "bare-image"),
    ("per-step, text", "lorajobs-text", "bare-text"),
    (
        "multi-epoch image job, SD-1.5-proportioned model (cache vs decode + encode every step)",
        "lorajobs-image-epochs",
        "bare-image-encode-every-step",
    ),
    (
        "variable-length text: lorajobs packed vs Trainer padding to max_length",
        "lorajobs-text-varlen-packed",
        "trainer-text-varlen-maxlen",
    ),
    (
        "variable-length text: lorajobs packed vs Trainer padding to the batch's longest",
        "lorajobs-text-varlen-packed",
        "trainer-text-varlen-longest",
    ),
    (
        "variable-length text: lorajobs padded (no packing) vs Trainer padding to longest",
        "lorajobs-text-varlen-padded",
        "trainer-text-varlen-longest",
    ),
    (
        "multi-epoch image job, the tests' tiny 64 px model (encode is cheap there)",
        "lorajobs-image-epochs-tiny",
        "bare-image-encode-every-step-tiny",
    ),
    # The per-step pairs again, both sides alternating in each process (see `alternating`).
    ("per-step, image, alternating in one process", "alternating-image", None),
    ("per-step, text, alternating in one process", "alternating-text", None),
    ("per-step, Flux (tiny Flux.1 pipeline, 64 px)", "lorajobs-flux", "bare-flux"),
    (
        "multi-epoch Flux job, tiny Flux.1 (cached latents + T5/CLIP embeddings vs encode every step)",
        "lorajobs-flux-epochs",
        "bare-flux-encode-every-step",
    ),
    ("per-step, Flux, alternating in one process", "alternating-flux", None),
]


def _run_worker(name: str, fx_path: Path, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        name,
        "--fixtures",
        str(fx_path),
        "--steps",
        str(args.steps),
        "--text-steps",
        str(args.text_steps),
        "--epochs",
        str(args.epochs),
        "--threads",
        str(args.threads),
        "--calls",
        str(args.calls),
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(ROOT),
    }
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--text-steps", type=int, default=150)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--calls", type=int, default=4, help="alternating pairs: calls of each side per process"
    )
    ap.add_argument("--only", default="", help="comma-separated pair numbers (1-12)")
    ap.add_argument("--worker")
    ap.add_argument("--fixtures")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.worker:
        fx = json.loads(Path(args.fixtures).read_text())
        print(json.dumps(WORKERS[args.worker](fx, args)))
        return

    root = Path(tempfile.gettempdir()) / "lorajobs-bench-fixtures"
    fx_path = root / "fixtures.json"
    root.mkdir(exist_ok=True)
    fx_path.write_text(json.dumps(build_fixtures(root)))
    chosen = [PAIRS[int(i) - 1] for i in args.only.split(",")] if args.only else PAIRS
    names = list(dict.fromkeys(n for _, a, b in chosen for n in (a, b) if n is not None))
    results: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names if r % 2 == 0 else names[::-1]:  # interleaved, alternating order
            results[n].append(_run_worker(n, fx_path, args))
            print(f"round {r + 1}: {n}: {results[n][-1]}", file=sys.stderr)

    def med(name: str, key: str) -> float:
        return statistics.median(x[key] for x in results[name])

    summary = {}
    print(
        f"\nthreads={args.threads} steps={args.steps} text_steps={args.text_steps} "
        f"epochs={args.epochs} rounds={args.rounds} (medians)"
    )
    for title, a, b in chosen:
        if b is None:
            summary[title] = _alternating_summary(results[a])
            print(f"- {title}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in summary[title].items()))
            continue
        row: dict[str, Any] = {"lorajobs": a, "baseline": b}
        if "epochs" not in a and "varlen" not in a:
            row["step_cpu_ms"] = (med(a, "step_cpu_s") * 1e3, med(b, "step_cpu_s") * 1e3)
            row["step_cpu_ratio"] = med(a, "step_cpu_s") / med(b, "step_cpu_s")
            row["step_wall_ms"] = (med(a, "step_s") * 1e3, med(b, "step_s") * 1e3)
            row["step_wall_ratio"] = med(a, "step_s") / med(b, "step_s")
            row["startup_cpu_s"] = (med(a, "startup_cpu_s"), med(b, "startup_cpu_s"))
            row["startup_wall_s"] = (med(a, "startup_s"), med(b, "startup_s"))
            row["peak_rss_mb"] = (med(a, "peak_rss_mb"), med(b, "peak_rss_mb"))
        if "epochs" in a:
            # Steady state (the clocks' span) and the whole job (process start to exit).
            row["step_cpu_ratio"] = med(a, "step_cpu_s") / med(b, "step_cpu_s")
            row["step_wall_ratio"] = med(a, "step_s") / med(b, "step_s")
            row["baseline_encode_share"] = med(b, "encode_share")
            row["job_cpu_s"] = (med(a, "job_cpu_s"), med(b, "job_cpu_s"))
            row["cpu_ratio"] = med(a, "job_cpu_s") / med(b, "job_cpu_s")
            row["job_wall_s"] = (med(a, "job_wall_s"), med(b, "job_wall_s"))
            row["wall_ratio"] = med(a, "job_wall_s") / med(b, "job_wall_s")
        if "varlen" in a:
            row["tokens_per_cpu_s"] = (med(a, "tokens_per_cpu_s"), med(b, "tokens_per_cpu_s"))
            row["tokens_cpu_ratio"] = med(a, "tokens_per_cpu_s") / med(b, "tokens_per_cpu_s")
            row["tokens_per_s"] = (med(a, "tokens_per_s"), med(b, "tokens_per_s"))
            row["tokens_wall_ratio"] = med(a, "tokens_per_s") / med(b, "tokens_per_s")
        if "steps" in results[a][0] and "steps" in results[b][0]:  # the same job on both sides
            row["same_steps"] = results[a][0]["steps"] == results[b][0]["steps"]
        if "final_loss" in results[b][0]:  # the same batches, masks and updates: equal losses
            row["same_losses"] = all(
                x["first_loss"] == y["first_loss"] and x["final_loss"] == y["final_loss"]
                for x, y in zip(results[a], results[b])
            )
        summary[title] = row
        print(
            f"- {title}: "
            + ", ".join(
                f"{k}={_fmt(v)}" for k, v in row.items() if k not in ("lorajobs", "baseline")
            )
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "raw": results}, indent=2))


def _alternating_summary(runs: list[dict]) -> dict[str, Any]:
    """Medians over every call of every process, and the median of the ratios of adjacent
    calls (lorajobs call i over bare call i: the fairest pairing)."""
    row: dict[str, Any] = {}
    for unit, key in (("cpu", "step_cpu_s"), ("wall", "step_s")):
        a = [x for r in runs for x in r[f"lorajobs_{key}"]]
        b = [x for r in runs for x in r[f"bare_{key}"]]
        row[f"step_{unit}_ms"] = (statistics.median(a) * 1e3, statistics.median(b) * 1e3)
        row[f"step_{unit}_ratio"] = statistics.median(a) / statistics.median(b)
        row[f"step_{unit}_paired_ratio"] = statistics.median(x / y for x, y in zip(a, b))
    row["calls"] = len([x for r in runs for x in r["lorajobs_step_s"]])
    return row


def _fmt(v: Any) -> str:
    if isinstance(v, tuple):
        return "(" + " vs ".join(f"{x:.3f}" for x in v) + ")"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    main()
