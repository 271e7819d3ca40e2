"""Benchmark: the lorajobs trainers against bare PyTorch + PEFT loops on the tiny models.

Not a test. Each measurement runs in its own fresh process (so start-up and peak RSS are
honest), and the pairs are interleaved round by round so machine noise hits both alike:

1. per-step time, image and text: lorajobs `train()` vs a bare loop doing the same work
   (same LoRA, same data, same cached latents, AdamW, clipping); plus start-up time
   (process start to first step) and peak RSS of each;
2. a multi-epoch image job: lorajobs (VAE latents + text embeddings computed once) vs the bare
   loop that encodes every batch every step — whole-job wall time;
3. useful (non-padding) tokens per second on a variable-length text set: lorajobs (packed, and
   padded) vs `transformers.Trainer` + PEFT padding to max_length, and to the batch's longest.

    .venv/bin/python bench/trainer.py [--steps 300] [--rounds 3] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

T0 = time.monotonic()  # process start, before torch: start-up time counts the imports
ROOT = Path(__file__).resolve().parents[1]
LR = 1e-3


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# -- fixtures (built once, shared by every worker process) ---------------------------------------


def build_fixtures(root: Path) -> dict[str, str]:
    from worker.tiny_image import build_tiny_image_model, make_image_dataset
    from worker.tiny_text import _sentence, build_tiny_text_model, make_text_dataset

    paths = {
        "image_model": root / "image-model", "image_data": root / "image-data",
        "text_model": root / "text-model", "text_data": root / "text.jsonl",
        "varlen_data": root / "varlen.jsonl",
    }
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


# -- workers: each runs in a fresh process and prints one JSON line ------------------------------


class Clock:
    """(step, wall, cpu) marks. Per-step figures come from the span between the first mark and
    the last, so start-up and export stay out; CPU time (this process only) is what to read on
    a shared, busy machine, where wall time also measures the neighbours."""

    def __init__(self) -> None:
        self.marks: list[tuple[int, float, float]] = []

    def mark(self, step: int) -> None:
        self.marks.append((step, time.monotonic(), time.process_time()))

    def report(self, p: dict) -> None:  # a WorkerContext.report: called every ~0.5 s
        self.mark(int(p["step"]))

    def figures(self) -> dict:
        if len(self.marks) < 2 or self.marks[-1][0] == self.marks[0][0]:
            raise RuntimeError("too few steps to time: raise --steps / --text-steps")
        (s0, w0, c0), (s1, w1, c1) = self.marks[0], self.marks[-1]
        n = max(1, s1 - s0)
        wall, cpu = (w1 - w0) / n, (c1 - c0) / n
        return {"step_s": wall, "step_cpu_s": cpu,
                # process start to step 0, extrapolated back from the first mark
                "startup_s": w0 - T0 - s0 * wall, "startup_cpu_s": c0 - s0 * cpu}


def _ctx(tmp: Path, threads: int, clock: Clock | None = None) -> Any:
    from worker.context import WorkerContext

    return WorkerContext(job_id="bench", output_uri=tmp.as_uri(), cache_dir=tmp, threads=threads,
                         report=clock.report if clock else (lambda _: None))


def lorajobs_image(fx: dict[str, str], steps: int, threads: int, epochs: int | None) -> dict:
    from jobspecs.models import ImageJobSpec
    from worker.trainers.image import train

    training = {"batch_size": 2, "resolution": 64, "learning_rate": LR, "checkpoint_every": 0}
    training.update({"epochs": epochs} if epochs else {"steps": steps})
    spec = ImageJobSpec(kind="image", name="bench", base_model="m", dataset="d",
                        lora={"rank": 4, "alpha": 8}, training=training)
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        out = train(spec, Path(fx["image_model"]), Path(fx["image_data"]), Path(tmp),
                    _ctx(Path(tmp), threads, clock))
    # The whole job, imports included, as for the bare loop.
    return {**clock.figures(), "steps": out.metrics["steps"], "job_wall_s": time.monotonic() - T0,
            "job_cpu_s": time.process_time(), "peak_rss_mb": _rss_mb()}


def bare_image(fx: dict[str, str], steps: int, threads: int, epochs: int | None,
               encode_every_step: bool = False) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTokenizer

    from worker.datasets.images import ImageCaptionDataset

    torch.set_num_threads(threads)
    m = Path(fx["image_model"])
    unet = UNet2DConditionModel.from_pretrained(m, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(m, subfolder="vae", local_files_only=True)
    te = CLIPTextModel.from_pretrained(m, subfolder="text_encoder", local_files_only=True)
    tok = CLIPTokenizer.from_pretrained(m, subfolder="tokenizer", local_files_only=True)
    sched = DDPMScheduler.from_pretrained(m, subfolder="scheduler", local_files_only=True)
    for mod in (unet, vae, te):
        mod.requires_grad_(False)
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_out.0", "to_q", "to_v"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    data = ImageCaptionDataset(Path(fx["image_data"]), 64)
    pixels = torch.stack([data[i].pixels for i in range(len(data))])
    captions = list(data.captions)

    @torch.no_grad()
    def encode(idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        z = vae.encode(pixels[idx]).latent_dist.mean * vae.config.scaling_factor
        ids = tok([captions[i] for i in idx], padding="max_length",
                  max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        return z, te(ids)[0]

    if not encode_every_step:
        all_z, all_e = encode(list(range(len(data))))
    n_steps = epochs * (len(data) // 2) if epochs else steps
    gen = torch.Generator().manual_seed(0)
    unet.train()
    clock = Clock()
    for step in range(n_steps):
        if step == 5:
            clock.mark(step)
        epoch, pos = divmod(step * 2, len(data))
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(epoch)).tolist()
        idx = perm[pos:pos + 2]
        if encode_every_step:
            clean, ctx = encode(idx)
        else:
            clean, ctx = all_z[idx], all_e[idx]
        noise = torch.randn(clean.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (2,), generator=gen)
        pred = unet(sched.add_noise(clean, noise, t), t, encoder_hidden_states=ctx).sample
        loss = F.mse_loss(pred.float(), noise.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss.item()
    clock.mark(n_steps)
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()},
                  str(Path(tmp) / "lora.safetensors"))
    return {**clock.figures(), "steps": n_steps, "job_wall_s": time.monotonic() - T0,
            "job_cpu_s": time.process_time(), "peak_rss_mb": _rss_mb()}


def lorajobs_text(fx: dict[str, str], steps: int, threads: int, data: str = "text_data",
                  batch: int = 4, max_len: int = 64, packing: bool = False) -> dict:
    from jobspecs.models import TextJobSpec
    from worker.trainers.text import train

    spec = TextJobSpec(kind="text", name="bench", base_model="m", dataset="d",
                       lora={"rank": 8, "alpha": 16},
                       training={"steps": steps, "batch_size": batch, "learning_rate": LR,
                                 "max_seq_length": max_len, "checkpoint_every": 0},
                       data={"packing": packing})
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        out = train(spec, Path(fx["text_model"]), Path(fx[data]), Path(tmp),
                    _ctx(Path(tmp), threads, clock))
    loop_cpu = clock.figures()["step_cpu_s"] * steps
    return {**clock.figures(), "steps": steps, "peak_rss_mb": _rss_mb(),
            "tokens_per_s": out.metrics["tokens"] / out.metrics["train_seconds"],
            "tokens_per_cpu_s": out.metrics["tokens"] / loop_cpu,
            "useful_fraction": out.metrics["useful_fraction"]}


def _tokenized(fx: dict[str, str], data: str, max_len: int) -> tuple[Any, list[list[int]], int]:
    from transformers import AutoTokenizer

    from worker.datasets.text import load_text_examples, tokenize_examples

    tok = AutoTokenizer.from_pretrained(fx["text_model"], local_files_only=True)
    seqs = [s for s in tokenize_examples(load_text_examples(Path(fx[data])), tok, max_len) if len(s) > 1]
    return tok, seqs, tok.pad_token_id


def bare_text(fx: dict[str, str], steps: int, threads: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    _, seqs, pad = _tokenized(fx, "text_data", 64)
    model = AutoModelForCausalLM.from_pretrained(fx["text_model"], local_files_only=True)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                             target_modules=["k_proj", "o_proj", "q_proj", "v_proj"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    rng = random.Random(0)
    order: list[int] = []
    clock = Clock()
    for step in range(steps):
        if step == 5:
            clock.mark(step)
        if len(order) < 4:
            perm = list(range(len(seqs)))
            rng.shuffle(perm)
            order += perm
        rows = [seqs[order.pop(0)] for _ in range(4)]
        width = max(map(len, rows))
        ids = torch.full((4, width), pad)
        mask = torch.zeros((4, width), dtype=torch.long)
        labels = torch.full((4, width), -100)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
            labels[i, :len(r)] = torch.tensor(r)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
    clock.mark(steps)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
    return {**clock.figures(), "steps": steps, "peak_rss_mb": _rss_mb()}


def hf_trainer_text(fx: dict[str, str], steps: int, threads: int, padding: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    torch.set_num_threads(threads)
    _, seqs, pad = _tokenized(fx, "varlen_data", 256)
    model = AutoModelForCausalLM.from_pretrained(fx["text_model"], local_files_only=True)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                             target_modules=["k_proj", "o_proj", "q_proj", "v_proj"]))
    useful = [0]

    def collate(rows: list[list[int]]) -> dict[str, torch.Tensor]:
        width = 256 if padding == "max_length" else max(map(len, rows))
        ids = torch.full((len(rows), width), pad)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        useful[0] += int(mask.sum())
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=4, max_steps=steps, learning_rate=LR,
            max_grad_norm=1.0, lr_scheduler_type="constant", report_to=[], save_strategy="no",
            logging_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0,
            disable_tqdm=True, remove_unused_columns=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=seqs, data_collator=collate)
        cpu0 = time.process_time()
        out = trainer.train()
        cpu = time.process_time() - cpu0
    loop = out.metrics["train_runtime"]
    return {"tokens_per_s": useful[0] / loop, "tokens_per_cpu_s": useful[0] / cpu,
            "step_s": loop / steps, "step_cpu_s": cpu / steps, "peak_rss_mb": _rss_mb(),
            "useful_fraction": useful[0] / (steps * 4 * 256) if padding == "max_length" else None}


WORKERS = {
    "lorajobs-image": lambda fx, a: lorajobs_image(fx, a.steps, a.threads, None),
    "bare-image": lambda fx, a: bare_image(fx, a.steps, a.threads, None),
    "lorajobs-image-epochs": lambda fx, a: lorajobs_image(fx, 0, a.threads, a.epochs),
    "bare-image-encode-every-step": lambda fx, a: bare_image(fx, 0, a.threads, a.epochs, True),
    "lorajobs-text": lambda fx, a: lorajobs_text(fx, a.steps, a.threads),
    "bare-text": lambda fx, a: bare_text(fx, a.steps, a.threads),
    "lorajobs-text-varlen-packed": lambda fx, a: lorajobs_text(fx, a.text_steps, a.threads,
                                                               "varlen_data", 4, 256, True),
    "lorajobs-text-varlen-padded": lambda fx, a: lorajobs_text(fx, a.text_steps, a.threads,
                                                               "varlen_data", 4, 256, False),
    "trainer-text-varlen-maxlen": lambda fx, a: hf_trainer_text(fx, a.text_steps, a.threads,
                                                                "max_length"),
    "trainer-text-varlen-longest": lambda fx, a: hf_trainer_text(fx, a.text_steps, a.threads,
                                                                 "longest"),
}

PAIRS = [
    ("per-step, image", "lorajobs-image", "bare-image"),
    ("per-step, text", "lorajobs-text", "bare-text"),
    ("multi-epoch image job (cache vs encode every step)", "lorajobs-image-epochs",
     "bare-image-encode-every-step"),
    ("variable-length text: lorajobs packed vs Trainer padding to max_length",
     "lorajobs-text-varlen-packed", "trainer-text-varlen-maxlen"),
    ("variable-length text: lorajobs packed vs Trainer padding to the batch's longest",
     "lorajobs-text-varlen-packed", "trainer-text-varlen-longest"),
    ("variable-length text: lorajobs padded (no packing) vs Trainer padding to longest",
     "lorajobs-text-varlen-padded", "trainer-text-varlen-longest"),
]


def _run_worker(name: str, fx_path: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--fixtures", str(fx_path),
           "--steps", str(args.steps), "--text-steps", str(args.text_steps),
           "--epochs", str(args.epochs), "--threads", str(args.threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
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
    ap.add_argument("--only", default="", help="comma-separated pair numbers (1-6)")
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
    names = list(dict.fromkeys(n for _, a, b in chosen for n in (a, b)))
    results: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for n in (names if r % 2 == 0 else names[::-1]):  # interleaved, alternating order
            results[n].append(_run_worker(n, fx_path, args))
            print(f"round {r + 1}: {n}: {results[n][-1]}", file=sys.stderr)

    def med(name: str, key: str) -> float:
        return statistics.median(x[key] for x in results[name])

    summary = {}
    print(f"\nthreads={args.threads} steps={args.steps} text_steps={args.text_steps} "
          f"epochs={args.epochs} rounds={args.rounds} (medians)")
    for title, a, b in chosen:
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
            row["job_cpu_s"] = (med(a, "job_cpu_s"), med(b, "job_cpu_s"))
            row["cpu_ratio"] = med(a, "job_cpu_s") / med(b, "job_cpu_s")
            row["job_wall_s"] = (med(a, "job_wall_s"), med(b, "job_wall_s"))
            row["wall_ratio"] = med(a, "job_wall_s") / med(b, "job_wall_s")
        if "varlen" in a:
            row["tokens_per_cpu_s"] = (med(a, "tokens_per_cpu_s"), med(b, "tokens_per_cpu_s"))
            row["tokens_cpu_ratio"] = med(a, "tokens_per_cpu_s") / med(b, "tokens_per_cpu_s")
            row["tokens_per_s"] = (med(a, "tokens_per_s"), med(b, "tokens_per_s"))
            row["tokens_wall_ratio"] = med(a, "tokens_per_s") / med(b, "tokens_per_s")
        summary[title] = row
        print(f"- {title}: " + ", ".join(
            f"{k}={_fmt(v)}" for k, v in row.items() if k not in ("lorajobs", "baseline")))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "raw": results}, indent=2))


def _fmt(v: Any) -> str:
    if isinstance(v, tuple):
        return "(" + " vs ".join(f"{x:.3f}" for x in v) + ")"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    main()
