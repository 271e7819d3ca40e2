"""The loops `bench/trainer.py` times: lorajobs' trainers, the bare PyTorch + PEFT loops that do
the same work, and `transformers.Trainer`. Each runs in a fresh worker process and returns one
JSON-able dict of figures."""

from __future__ import annotations

import random
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from sd_proportions import BENCH_RESOLUTION  # bench/, beside this

T0 = time.monotonic()  # imported at process start, before torch: start-up counts the imports
LR = 1e-3


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# -- workers: each runs in a fresh process and prints one JSON line ------------------------------


class Clock:
    """(step, wall, cpu) marks. Per-step figures come from the span between the first mark and
    the last, so start-up and export stay out; CPU time (this process only) is what to read on
    a shared, busy machine, where wall time also measures the neighbours."""

    def __init__(self) -> None:
        self.marks: list[tuple[int, float, float]] = []
        self._last: float | None = None
        from lorajobs.worker.trainers.loop import REPORT_EVERY_S

        self.every = REPORT_EVERY_S

    def mark(self, step: int) -> None:
        self.marks.append((step, time.monotonic(), time.process_time()))

    def report(self, p: dict) -> None:  # a WorkerContext.report: called every ~0.5 s
        self.mark(int(p["step"]))

    def tick(self, step: int, total: int) -> None:
        """A bare loop's report, on `TrainLoop`'s policy (every REPORT_EVERY_S and at the last
        step), so both sides are timed over the same kind of window."""
        now = time.monotonic()
        if self._last is None:
            self._last = now
        elif now - self._last >= self.every or step == total:
            self.mark(step)
            self._last = now

    def figures(self) -> dict:
        if len(self.marks) < 2 or self.marks[-1][0] == self.marks[0][0]:
            raise RuntimeError("too few steps to time: raise --steps / --text-steps")
        (s0, w0, c0), (s1, w1, c1) = self.marks[0], self.marks[-1]
        n = max(1, s1 - s0)
        wall, cpu = (w1 - w0) / n, (c1 - c0) / n
        return {
            "step_s": wall,
            "step_cpu_s": cpu,
            # process start to step 0, extrapolated back from the first mark
            "startup_s": w0 - T0 - s0 * wall,
            "startup_cpu_s": c0 - s0 * cpu,
        }


def _ctx(tmp: Path, threads: int, clock: Clock | None = None) -> Any:
    from lorajobs.worker.context import WorkerContext

    return WorkerContext(
        job_id="bench",
        output_uri=tmp.as_uri(),
        cache_dir=tmp,
        threads=threads,
        report=clock.report if clock else (lambda _: None),
    )


IMAGE_SETS = {  # model fixture, data fixture, resolution
    "tiny": ("image_model", "image_data", 64),
    "sd": ("sd_model", "sd_data", BENCH_RESOLUTION),
}


def lorajobs_image(
    fx: dict[str, str], steps: int, threads: int, epochs: int | None, models: str = "tiny"
) -> dict:
    from lorajobs.jobspecs.models import ImageJobSpec
    from lorajobs.worker.trainers.image.recipe import train

    model, data, resolution = IMAGE_SETS[models]
    training = {
        "batch_size": 2,
        "resolution": resolution,
        "learning_rate": LR,
        "checkpoint_every": 0,
    }
    training.update({"epochs": epochs} if epochs else {"steps": steps})
    spec = ImageJobSpec(
        kind="image",
        name="bench",
        base_model="m",
        dataset="d",
        lora={"rank": 4, "alpha": 8},
        training=training,
    )
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        out = train(
            spec, Path(fx[model]), Path(fx[data]), Path(tmp), _ctx(Path(tmp), threads, clock)
        )
    # The whole job, imports included, as for the bare loop.
    return {
        **clock.figures(),
        "steps": out.metrics["steps"],
        "job_wall_s": time.monotonic() - T0,
        "job_cpu_s": time.process_time(),
        "peak_rss_mb": _rss_mb(),
    }


def _decode(path: Path, resolution: int) -> Any:
    """What a training script's transforms do to an image file: decode, resize the shorter side,
    center-crop, scale to [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as raw:
        img = raw.convert("RGB")
    scale = resolution / min(img.size)
    w, h = max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - resolution) // 2, (h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def bare_image(
    fx: dict[str, str],
    steps: int,
    threads: int,
    epochs: int | None,
    encode_every_step: bool = False,
    models: str = "tiny",
) -> dict:
    """The loop a user would write: LoRA on the UNet (lorajobs' targets and init), AdamW
    without weight decay, clipping at 1.0, batch 2 in a per-epoch shuffled order.

    `encode_every_step`: what diffusers' train_text_to_image_lora.py does — every step decodes
    its image files, resizes and crops them, VAE-encodes them and encodes the captions. Else
    images are decoded and encoded once, as lorajobs' cache does. The time of each step's
    data + encode work is measured apart (`encode_share`).
    """
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTokenizer

    model, data, resolution = IMAGE_SETS[models]
    torch.set_num_threads(threads)
    m = Path(fx[model])
    unet = UNet2DConditionModel.from_pretrained(m, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(m, subfolder="vae", local_files_only=True)
    te = CLIPTextModel.from_pretrained(m, subfolder="text_encoder", local_files_only=True)
    tok = CLIPTokenizer.from_pretrained(m, subfolder="tokenizer", local_files_only=True)
    sched = DDPMScheduler.from_pretrained(m, subfolder="scheduler", local_files_only=True)
    for mod in (unet, vae, te):
        mod.requires_grad_(False)
    torch.manual_seed(0)
    unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=8,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_out.0", "to_q", "to_v"],
        )
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    files = sorted(Path(fx[data]).glob("*.png"))
    captions = [f.with_suffix(".txt").read_text(encoding="utf-8").strip() for f in files]

    @torch.no_grad()
    def encode(idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.stack([_decode(files[i], resolution) for i in idx])
        z = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        ids = tok(
            [captions[i] for i in idx],
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return z, te(ids)[0]

    if not encode_every_step:
        all_z, all_e = encode(list(range(len(files))))
    n_steps = epochs * (len(files) // 2) if epochs else steps
    gen = torch.Generator().manual_seed(0)
    unet.train()
    clock = Clock()
    clock.tick(0, n_steps)
    encode_cpu, loop_start = 0.0, time.process_time()
    for step in range(n_steps):
        epoch, pos = divmod(step * 2, len(files))
        perm = torch.randperm(len(files), generator=torch.Generator().manual_seed(epoch)).tolist()
        idx = perm[pos : pos + 2]
        if encode_every_step:
            c0 = time.process_time()
            clean, ctx = encode(idx)
            encode_cpu += time.process_time() - c0
        else:
            clean, ctx = all_z[idx], all_e[idx]
        noise = torch.randn(clean.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (2,), generator=gen)
        pred = unet(sched.add_noise(clean, noise, t), t, encoder_hidden_states=ctx).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        clock.tick(step + 1, n_steps)
    loop_cpu = time.process_time() - loop_start
    with tempfile.TemporaryDirectory() as tmp:
        save_file(
            {k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()},
            str(Path(tmp) / "lora.safetensors"),
        )
    return {
        **clock.figures(),
        "steps": n_steps,
        "job_wall_s": time.monotonic() - T0,
        "job_cpu_s": time.process_time(),
        "peak_rss_mb": _rss_mb(),
        "encode_share": encode_cpu / max(loop_cpu, 1e-9),
    }


def lorajobs_text(
    fx: dict[str, str],
    steps: int,
    threads: int,
    data: str = "text_data",
    batch: int = 4,
    max_len: int = 64,
    packing: bool = False,
) -> dict:
    from lorajobs.jobspecs.models import TextJobSpec
    from lorajobs.worker.trainers.text.recipe import train

    spec = TextJobSpec(
        kind="text",
        name="bench",
        base_model="m",
        dataset="d",
        lora={"rank": 8, "alpha": 16},
        training={
            "steps": steps,
            "batch_size": batch,
            "learning_rate": LR,
            "max_seq_length": max_len,
            "checkpoint_every": 0,
        },
        data={"packing": packing},
    )
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        out = train(
            spec, Path(fx["text_model"]), Path(fx[data]), Path(tmp), _ctx(Path(tmp), threads, clock)
        )
    loop_cpu = clock.figures()["step_cpu_s"] * steps
    return {
        **clock.figures(),
        "steps": steps,
        "peak_rss_mb": _rss_mb(),
        "tokens_per_s": out.metrics["tokens"] / out.metrics["train_seconds"],
        "tokens_per_cpu_s": out.metrics["tokens"] / loop_cpu,
        "useful_fraction": out.metrics["useful_fraction"],
        "first_loss": out.metrics["first_loss"],
        "final_loss": out.metrics["final_loss"],
    }


def _tokenized(fx: dict[str, str], data: str, max_len: int) -> tuple[Any, list[list[int]], int]:
    from transformers import AutoTokenizer

    from lorajobs.worker.trainers.text.plain import load_text_examples, tokenize_examples

    tok = AutoTokenizer.from_pretrained(fx["text_model"], local_files_only=True)
    seqs = [
        s for s in tokenize_examples(load_text_examples(Path(fx[data])), tok, max_len) if len(s) > 1
    ]
    return tok, seqs, tok.pad_token_id


def bare_text(fx: dict[str, str], steps: int, threads: int) -> dict:
    """The loop a user would write for the same job, doing the same work as `lorajobs_text`:
    the same examples in the same batches (lorajobs' per-epoch order, reproduced here), padded
    per batch with a mask, no KV cache, AdamW without weight decay, clipping at 1.0. Its
    losses must equal lorajobs' bit for bit (`main` checks): then the work is the same."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    _, seqs, pad = _tokenized(fx, "text_data", 64)
    model = AutoModelForCausalLM.from_pretrained(fx["text_model"], local_files_only=True)
    model = get_peft_model(
        model,
        LoraConfig(
            task_type="CAUSAL_LM",
            r=8,
            lora_alpha=16,
            target_modules=["k_proj", "o_proj", "q_proj", "v_proj"],
        ),
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    orders: dict[int, list[int]] = {}
    losses: list[float] = []
    clock = Clock()
    clock.tick(0, steps)
    for step in range(steps):
        rows = []
        for k in range(step * 4, step * 4 + 4):  # a batch may span two epochs
            epoch, pos = divmod(k, len(seqs))
            if epoch not in orders:
                orders[epoch] = list(range(len(seqs)))
                random.Random(f"lorajobs-text:0:{epoch}").shuffle(orders[epoch])
            rows.append(seqs[orders[epoch][pos]])
        width = max(map(len, rows))
        ids = torch.full((4, width), pad)
        mask = torch.zeros((4, width), dtype=torch.long)
        labels = torch.full((4, width), -100)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
            labels[i, : len(r)] = torch.tensor(r)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        clock.tick(step + 1, steps)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
    return {
        **clock.figures(),
        "steps": steps,
        "peak_rss_mb": _rss_mb(),
        "first_loss": losses[0],
        "final_loss": losses[-1],
    }


def hf_trainer_text(fx: dict[str, str], steps: int, threads: int, padding: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    torch.set_num_threads(threads)
    _, seqs, pad = _tokenized(fx, "varlen_data", 256)
    model = AutoModelForCausalLM.from_pretrained(fx["text_model"], local_files_only=True)
    model = get_peft_model(
        model,
        LoraConfig(
            task_type="CAUSAL_LM",
            r=8,
            lora_alpha=16,
            target_modules=["k_proj", "o_proj", "q_proj", "v_proj"],
        ),
    )
    useful = [0]

    def collate(rows: list[list[int]]) -> dict[str, torch.Tensor]:
        width = 256 if padding == "max_length" else max(map(len, rows))
        ids = torch.full((len(rows), width), pad)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        useful[0] += int(mask.sum())
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=4,
            max_steps=steps,
            learning_rate=LR,
            max_grad_norm=1.0,
            lr_scheduler_type="constant",
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            use_cpu=True,
            dataloader_num_workers=0,
            seed=0,
            disable_tqdm=True,
            remove_unused_columns=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=seqs, data_collator=collate)
        cpu0 = time.process_time()
        out = trainer.train()
        cpu = time.process_time() - cpu0
    loop = out.metrics["train_runtime"]
    return {
        "tokens_per_s": useful[0] / loop,
        "tokens_per_cpu_s": useful[0] / cpu,
        "step_s": loop / steps,
        "step_cpu_s": cpu / steps,
        "peak_rss_mb": _rss_mb(),
        "useful_fraction": useful[0] / (steps * 4 * 256) if padding == "max_length" else None,
    }


def alternating(lorajobs: Any, bare: Any, calls: int) -> dict:
    """Per-step times of `lorajobs()` and `bare()` called alternately `calls` times each in this
    one process. Between processes the same loop's step time varies by ~5-10 % here (memory
    layout, which core, the neighbours): more than the overheads to measure. In one process,
    adjacent calls share those conditions."""
    out: dict[str, list[float]] = {
        "lorajobs_step_cpu_s": [],
        "bare_step_cpu_s": [],
        "lorajobs_step_s": [],
        "bare_step_s": [],
    }
    for i in range(calls):
        for side, fn in (("lorajobs", lorajobs), ("bare", bare))[:: 1 if i % 2 == 0 else -1]:
            r = fn()
            out[f"{side}_step_cpu_s"].append(r["step_cpu_s"])
            out[f"{side}_step_s"].append(r["step_s"])
    return out
