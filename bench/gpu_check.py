"""GPU check: step time (ms/step) and peak GPU memory (`torch.cuda.max_memory_allocated`) of
lorajobs' trainers against bare loops doing the same work, in one process, in bf16.

Sections (`--only a,b`; all by default):

  image       SD 1.5's UNet (its config written out, random init, no hub) at 512 px (64x64
              latents), LoRA r=16 on the attention projections, batch 2: our image trainer's
              `train()` vs a bare diffusers + PEFT loop (latents cached by both).
  text        a ~1B random Llama (hidden 2048, 16 layers, 32 heads, intermediate 5632, vocab
              32000), seq 1024, batch 4, LoRA r=16: our text trainer's `train()` vs a bare loop.
  text_nf4    the same with `quantize_base: nf4`, gradient checkpointing and 8-bit AdamW
              (bitsandbytes) vs a bare QLoRA loop with the same settings.
  text_fp8    ours only: `quantize_base: fp8` (float8 weights, torch only), a correctness run.
  flux        a Flux-shaped transformer (real Flux widths, 2 double + 4 single blocks), 1024 px
              latents (4096 tokens), T5 length 512, LoRA r=16: lorajobs' Flux trainer
              (`flux_lorajobs_step`: cached latents and prompt embeddings, guidance 3.5) vs a
              bare flow-matching step on the same transformer.
  flux_nf4    the bare Flux step on a base quantized by `quantize_flux_transformer(.., "nf4")`.
  flux_fp8    the same with "fp8" (float8 weights; torch only).

Each side runs a few warm-up steps, then `--steps` timed ones (ours: measured from the trainer's
own progress reports, which exclude loading and export). Peak memory is per side, from a reset.
`--tiny` runs every section with tiny sizes (CPU if there is no GPU; bitsandbytes sections are
then skipped) so the script can be tested anywhere. `--budget-s` stops starting sections once
spent. `--json PATH` writes the results.

Expected on one H200: about 3-4 minutes (model builds included). Conservatively, in bf16 at a
third of peak: image 2 x 3.4 TFLOP/step (~25 ms), text ~18 TFLOP/step (~60 ms; nf4 + checkpointing
~2.5x), Flux ~30 TFLOP/step (~100 ms): ~300 timed steps in all take under a minute; building the
random models (initialised on the GPU), writing them to /tmp and loading them back takes the rest.

Device command (the repository is not installed there; `lorajobs.*` is mapped onto the checkout
by `_import_shim`). First, here: `bash bench/gpu_wheels.sh` (fills the git-ignored `.whl/`,
52 MB), then one device run with `carry: [".whl"]` and `timeout_s: 480`:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
    PYTHONPATH=/tmp/site:. timeout 450 python3 bench/gpu_check.py --json $OUT/gpu_check.json \
        2>&1 | grep -v -e 'Loading weights' -e 'Writing model shards' | tail -120

It prints one line per side (ms/step, peak GiB) and writes $OUT/gpu_check.json after every
section, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Nothing comes from a hub (every model is built here): never wait on a network call.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
PARTS = ("jobspecs", "storage", "orchestrator", "worker")


def _import_shim() -> None:
    """Make `lorajobs.<part>` the checkout's `<part>/` folder (as pyproject's package-dir maps
    it) when lorajobs is not installed."""
    if importlib.util.find_spec("lorajobs") is not None:
        return
    import types

    root = types.ModuleType("lorajobs")
    root.__path__ = []  # a namespace: its parts are registered below
    sys.modules["lorajobs"] = root
    for part in PARTS:
        spec = importlib.util.spec_from_file_location(
            f"lorajobs.{part}",
            REPO / part / "__init__.py",
            submodule_search_locations=[str(REPO / part)],
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        setattr(root, part, module)
        spec.loader.exec_module(module)


_import_shim()
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the gpu_* modules, beside this

import gpu_image  # noqa: E402
import gpu_models  # noqa: E402
import gpu_sections as sections  # noqa: E402

SECTIONS: dict[str, Callable[[sections.Setup], dict[str, Any]]] = {
    "image": gpu_image.image,
    "text": gpu_models.text,
    "text_nf4": gpu_models.text_nf4,
    "text_fp8": gpu_models.text_fp8,
    "flux": gpu_models.flux,
    "flux_nf4": gpu_models.flux_nf4,
    "flux_fp8": gpu_models.flux_fp8,
}


def _print_row(name: str, res: dict[str, Any]) -> None:
    if "skipped" in res or "error" in res:
        print(f"{name:10s} {res.get('skipped') or res.get('error')}", flush=True)
        return
    for side in ("lorajobs", "bare"):
        r = res.get(side)
        if isinstance(r, dict) and "ms_per_step" in r:
            print(
                f"{name:10s} {side:9s} {r['ms_per_step']:9.1f} ms/step  "
                f"peak {r['peak_gib']:7.2f} GiB  ({r['steps']} steps)",
                flush=True,
            )
        elif r is not None:
            print(f"{name:10s} {side:9s} {r}", flush=True)
    if "ratio" in res:
        print(f"{name:10s} lorajobs/bare: time {res['ratio']:.3f}x, memory {res['mem_ratio']:.3f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (CPU if no GPU): a self-test")
    ap.add_argument("--only", default="", help=f"comma list of sections: {','.join(SECTIONS)}")
    ap.add_argument("--json", type=Path, default=None, help="write the results to this file")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per side")
    ap.add_argument("--budget-s", type=float, default=330.0, help="start no section after this")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lorajobs-gpu-check"))
    args = ap.parse_args(argv)
    only = [s for s in args.only.split(",") if s] or list(SECTIONS)
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        ap.error(f"--only: unknown section(s) {unknown}; known: {list(SECTIONS)}")

    setup = sections.Setup.create(args.tiny, args.steps, args.warmup, args.work)
    t0 = time.monotonic()
    out: dict[str, Any] = {"setup": setup.describe(), "sections": {}}
    print(json.dumps(out["setup"]), flush=True)
    for name in only:
        if time.monotonic() - t0 > args.budget_s:
            res: dict[str, Any] = {"skipped": f"budget of {args.budget_s:.0f} s spent"}
        else:
            t = time.monotonic()
            try:
                res = SECTIONS[name](setup)
            except Exception as err:  # noqa: BLE001 - one section's failure is a result too
                res = {"error": f"{type(err).__name__}: {err}".splitlines()[0]}
                traceback.print_exc()
            res["section_s"] = round(time.monotonic() - t, 1)
        sections.free()
        out["sections"][name] = res
        _print_row(name, res)
        if args.json:  # written after every section: a run cut short keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=2, default=str))
    out["total_s"] = round(time.monotonic() - t0, 1)
    out["third_party_modules"] = sections.third_party_modules()
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    print(f"total {out['total_s']} s", flush=True)
    failed = [n for n, r in out["sections"].items() if "error" in r]
    gc.collect()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
