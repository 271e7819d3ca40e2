"""Benchmark: many LoRAs on one base, packed into one worker vs trained one after another.

Not a test. Two parts:

1. Through the queue (CPU, `--device cpu`): a simulated cluster with one worker node (one
   logical GPU, one CPU), the controller in this process on a SQLite home, `--jobs` tiny text
   jobs (the tiny Llama, `--steps` each, different seeds and ranks) submitted at once; the
   wall time from the first submit to the last `succeeded`, with packing on
   (`LORAJOBS_PACKING=auto`) and off (one attempt after another).
2. Per step, in one process: a pack of N adapters (one forward/backward over the concatenated
   batches, then N optimizer steps) against N solo steps (each adapter alone on its batch):
   ms per step and, on a GPU, peak memory.

`--device cuda --real-size` runs part 2 only, on a ~1B random-init Llama (hidden 2048,
16 layers, GQA 32/8 heads, vocab 32000) with 8 LoRAs of rank 16 on q/k/v/o, sequence 512, bf16
base with fp32 LoRAs under bf16 autocast. That path imports torch, transformers and peft only
(the pack modules are loaded from their files: no lorajobs install, no ray/boto3/sqlalchemy).

    .venv/bin/python bench/packing.py [--jobs 8] [--steps 200] [--json out.json]
    python bench/packing.py --device cuda --real-size [--n 8] [--batch 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

PACK_MODULES = {
    "lorajobs.worker.trainers.pack_lora": "worker/trainers/pack_lora.py",
    "lorajobs.worker.trainers.text.pack_attention": "worker/trainers/text/pack_attention.py",
}


def _pack_modules() -> tuple[Any, Any]:
    """The two pack modules, loaded from their files (they import only torch/transformers)."""
    for name, rel in PACK_MODULES.items():
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, ROOT / rel)
            assert spec is not None and spec.loader is not None
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
    return tuple(sys.modules[n] for n in PACK_MODULES)  # type: ignore[return-value]


# -- part 2: per step --------------------------------------------------------------------------


def _model(real: bool, device: str) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if real:
        cfg = LlamaConfig(
            hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
            num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
            max_position_embeddings=1024,
        )  # fmt: skip
    else:
        cfg = LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=384, max_position_embeddings=256,
        )  # fmt: skip
    cfg.use_cache = False
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # built where it runs: a 1B init on the CPU takes long
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model


def per_step(device: str, real: bool, n: int, batch: int, seq: int, iters: int) -> dict[str, Any]:
    """ms per step of a pack of `n` adapters against `n` solo steps, and peak GPU memory."""
    import torch
    from peft import LoraConfig, get_peft_model

    pack_lora, pack_attention = _pack_modules()
    torch.set_num_threads(max(1, os.cpu_count() or 1) if device == "cuda" else 2)
    t_build = time.monotonic()
    base = _model(real, device)
    model = None
    for i in range(n):
        cfg = LoraConfig(
            task_type="CAUSAL_LM", r=16 if real else 4, lora_alpha=32 if real else 8,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        )  # fmt: skip
        if model is None:
            model = get_peft_model(base, cfg, adapter_name=f"pack{i}")
        else:
            model.add_adapter(f"pack{i}", cfg)
    assert model is not None
    pack = pack_lora.PackSlices()
    pack_lora.install(model, pack)
    pack_attention.install_attention(model.get_base_model(), pack)
    model.train()
    names = [f"pack{i}" for i in range(n)]
    opts = {
        name: torch.optim.AdamW([p for _, p in pack_lora.adapter_params(model, name)], lr=1e-4)
        for name in names
    }
    inner = model.get_base_model()
    vocab = inner.config.vocab_size
    g = torch.Generator().manual_seed(0)
    batches = {
        name: torch.randint(3, vocab, (batch, seq), generator=g).to(device) for name in names
    }
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else _nullcontext()
    build_s = time.monotonic() - t_build

    def loss_of(logits: Any, ids: Any) -> Any:
        return inner.loss_function(logits=logits, labels=ids, vocab_size=vocab)

    def pack_step() -> None:
        pack.set_rows([(nm, batch, seq) for nm in names], [True] * n)
        ids = torch.cat([batches[nm] for nm in names])
        with autocast:
            logits = model(input_ids=ids).logits
            total = None
            for nm, (_, rows) in zip(names, pack.slices):
                loss = loss_of(logits[rows].contiguous(), batches[nm])
                total = loss if total is None else total + loss
        total.backward()
        for nm in names:
            opts[nm].step()
            opts[nm].zero_grad(set_to_none=True)

    def solo_steps() -> None:
        for nm in names:
            pack.alone(nm)
            with autocast:
                loss = loss_of(model(input_ids=batches[nm]).logits, batches[nm])
            loss.backward()
            opts[nm].step()
            opts[nm].zero_grad(set_to_none=True)

    out: dict[str, Any] = {"device": device, "real_size": real, "n": n, "batch": batch,
                           "seq": seq, "build_s": round(build_s, 2)}  # fmt: skip
    if real:
        out["base_params_M"] = round(sum(p.numel() for p in base.parameters()) / 1e6, 1)
    # Interleaved, median of each: a busy machine's drift hits both sides alike.
    times: dict[str, list[float]] = {"pack": [], "solo_x_n": []}
    peaks: dict[str, float] = {}
    pack_step()  # warm-up (kernels, allocator, optimizer state)
    solo_steps()
    for _ in range(iters):
        for label, fn in (("pack", pack_step), ("solo_x_n", solo_steps)):
            _sync(device)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = time.monotonic()
            fn()
            _sync(device)
            times[label].append(time.monotonic() - t)
            if device == "cuda":
                peaks[label] = max(peaks.get(label, 0.0), torch.cuda.max_memory_allocated())
    for label, ts in times.items():
        out[f"{label}_ms"] = round(statistics.median(ts) * 1000, 2)
        if label in peaks:
            out[f"{label}_peak_gib"] = round(peaks[label] / 2**30, 2)
    out["speedup"] = round(out["solo_x_n_ms"] / out["pack_ms"], 2)
    return out


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# -- part 1: through the queue -------------------------------------------------------------------


def _queue_spec(name: str, model: Path, data: Path, steps: int, i: int) -> Any:
    from lorajobs.jobspecs import parse_spec

    return parse_spec(
        {
            "kind": "text", "name": name, "base_model": str(model), "dataset": str(data),
            "lora": {"rank": 4 + 4 * (i % 2), "alpha": 8},
            "training": {"steps": steps, "batch_size": 2, "learning_rate": 1e-3, "seed": i,
                         "max_seq_length": 64},
            "resources": {"gpus": 1, "cpus": 1},
        }
    )  # fmt: skip


def through_queue(jobs: int, steps: int) -> dict[str, Any]:
    """Wall time from the first submit to the last `succeeded`, packing on and off."""
    import shutil
    import tempfile

    sys.path.insert(0, str(ROOT))
    from bench.makespan import controller_for, start_cluster, tiny_inputs

    out: dict[str, Any] = {"jobs": jobs, "steps": steps}
    # The node's GPU is logical: its jobs train on the CPU (nodes inherit this environment).
    os.environ["LORAJOBS_ALLOW_CPU_FALLBACK"] = "1"
    work = Path(tempfile.mkdtemp(prefix="ljbench-packing-"))
    cluster, _, ray_tmp = start_cluster(1)
    try:
        model, data = tiny_inputs(work)
        for mode in ("auto", "off"):
            queue, ctl = controller_for(
                cluster.address, work / f"home-{mode}", packing=mode, poll_s=0.2
            )
            bucket = f"file://{work / ('bucket-' + mode)}"
            # A warm node first (a Ray worker with torch imported, as a busy node has one): the
            # first attempt's process start would otherwise count against one mode only.
            warm = queue.submit(_queue_spec("warm-up", model, data, 1, 0), output_uri=bucket)[0]
            ctl.run(until=lambda q=queue, w=warm.id: q.get(w).status.is_terminal())
            t0 = time.time()
            ids = []
            for i in range(jobs):
                spec = _queue_spec(f"job-{i}", model, data, steps, i)
                ids.append(queue.submit(spec, output_uri=bucket)[0].id)
            ctl.run(until=lambda q=queue, ids=ids: all(q.get(i).status.is_terminal() for i in ids))
            done = [queue.get(i) for i in ids]
            assert all(j.status.value == "succeeded" for j in done), [
                j.failure_reason for j in done
            ]
            wall = max(j.finished_at.timestamp() for j in done) - t0
            out[f"{'packed' if mode == 'auto' else 'sequential'}_s"] = round(wall, 2)
            out[f"attempts_{mode}"] = len({j.pack_id or j.id for j in done})
            out[f"in_task_train_s_{mode}"] = round(
                max(j.result["metrics"]["train_seconds"] for j in done)
                if mode == "auto"
                else sum(j.result["metrics"]["train_seconds"] for j in done),
                2,
            )
        out["speedup"] = round(out["sequential_s"] / out["packed_s"], 2)
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--real-size", action="store_true", help="~1B Llama (GPU), per step only")
    ap.add_argument("--jobs", type=int, default=8, help="jobs through the queue (CPU part)")
    ap.add_argument("--steps", type=int, default=200, help="steps per job (CPU part)")
    ap.add_argument("--n", type=int, default=8, help="adapters in the per-step pack")
    ap.add_argument("--batch", type=int, default=2, help="rows per adapter per step")
    ap.add_argument("--seq", type=int, default=0, help="sequence length (512 real, 64 tiny)")
    ap.add_argument("--iters", type=int, default=0, help="timed steps (default 5 real, 30)")
    ap.add_argument("--skip-queue", action="store_true", help="per-step part only")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    seq = args.seq or (512 if args.real_size else 64)
    iters = args.iters or (5 if args.real_size else 30)
    result: dict[str, Any] = {
        "per_step": per_step(args.device, args.real_size, args.n, args.batch, seq, iters)
    }
    print(json.dumps(result["per_step"]), flush=True)
    if args.device == "cpu" and not args.real_size and not args.skip_queue:
        result["queue"] = through_queue(args.jobs, args.steps)
        print(json.dumps(result["queue"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
