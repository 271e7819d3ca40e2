"""Text LoRA trainer: PEFT LoRA on a transformers causal LM, trained on JSONL text.

Reads top to bottom: threads + seeds -> tokenizer + model -> LoRA -> tokenised data -> train
loop -> PEFT export made byte-deterministic. Same spec + same data + same thread count on CPU
gives the same adapter bytes.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from jobspecs.errors import UserDataError
from jobspecs.models import TextJobSpec
from worker.context import TrainOutput, WorkerContext
from worker.datasets.text import load_text_examples, tokenize_examples
from worker.safetensors_io import save_canonical

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MAX_GRAD_NORM = 1.0  # what the usual LoRA recipes clip to; keeps high learning rates stable
REPORT_EVERY_S = 0.5
CURVE_POINTS = 20


def train(
    spec: TextJobSpec, model_dir: Path, data_path: Path, out_dir: Path, ctx: WorkerContext
) -> TrainOutput:
    """Train a LoRA for `spec` on the model in `model_dir`; write a PEFT folder into `out_dir`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start = time.monotonic()
    tr = spec.training

    # 1. Threads and seeds: the thread count changes float reduction order, so it is fixed per job.
    torch.set_num_threads(ctx.threads)
    torch.manual_seed(tr.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 base weights on GPUs that have it (LoRA weights stay fp32, PEFT upcasts them).
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if use_bf16 else torch.float32

    # 2. Data first: a bad dataset should fail before the (possibly large) model loads.
    examples = load_text_examples(data_path)

    # 3. Tokenizer and model, from the pulled folder only.
    if not (model_dir / "config.json").is_file():
        raise UserDataError(
            f"base model {spec.base_model}: no config.json (not a transformers model folder)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserDataError(f"base model {spec.base_model}: cannot load: {first_line}") from None
    # Padded positions are masked out of attention and loss, so any id will do as padding.
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    model.config.use_cache = False  # no KV cache while training: it only costs memory

    # 4. LoRA.
    lora_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=spec.lora.rank,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=spec.target_modules(),
    )
    try:
        model = get_peft_model(model, lora_config)
    except ValueError as err:  # e.g. target modules that this model does not have
        raise UserDataError(f"base model {spec.base_model}: {err}") from None
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tr.learning_rate, weight_decay=tr.weight_decay)

    # 5. Tokenise once. A one-token sequence predicts nothing; a batch of only those has no loss.
    sequences = [s for s in tokenize_examples(examples, tokenizer, tr.max_seq_length) if len(s) > 1]
    if not sequences:
        raise UserDataError(f"dataset {spec.dataset}: no example is longer than one token")

    # 6. Train.
    losses: list[float] = []
    tokens = 0
    orders: dict[int, list[int]] = {}
    t_train = time.monotonic()
    last_report, last_step = t_train, 0
    for step in range(1, tr.steps + 1):
        idx = _batch_indices(step - 1, tr.batch_size, len(sequences), tr.seed, orders)
        input_ids, attention_mask, labels = _pad_batch([sequences[i] for i in idx], pad_id)
        out = model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            labels=labels.to(device),
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        tokens += int(attention_mask.sum())

        now = time.monotonic()
        if now - last_report >= REPORT_EVERY_S or step == tr.steps:
            it_per_s = (step - last_step) / max(now - last_report, 1e-9)
            ctx.report(
                {"step": step, "total_steps": tr.steps, "loss": losses[-1], "it_per_s": it_per_s}
            )
            last_report, last_step = now, step
    train_seconds = time.monotonic() - t_train

    # 7. Export: PEFT's folder, then rewritten so the bytes depend only on the tensors.
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    _canonicalise_peft_folder(out_dir, spec.base_model)

    return TrainOutput(
        files=[ADAPTER_CONFIG, ADAPTER_WEIGHTS],
        metrics={
            "first_loss": losses[0],
            "final_loss": losses[-1],
            "loss_curve": loss_curve(losses, CURVE_POINTS),
            "steps": tr.steps,
            "examples": len(sequences),
            "examples_seen": tr.steps * tr.batch_size,
            "tokens": tokens,
            "train_seconds": round(train_seconds, 3),
            "total_seconds": round(time.monotonic() - t_start, 3),
        },
        resolved={
            "rank": spec.lora.rank,
            "alpha": spec.lora.alpha,
            "dropout": spec.lora.dropout,
            "target_modules": spec.target_modules(),
            "steps": tr.steps,
            "batch_size": tr.batch_size,
            "learning_rate": tr.learning_rate,
            "weight_decay": tr.weight_decay,
            "max_seq_length": tr.max_seq_length,
            "seed": tr.seed,
            "optimizer": "adamw",
            "max_grad_norm": MAX_GRAD_NORM,
            "lr_schedule": "constant",
            "epochs": round(tr.steps * tr.batch_size / len(sequences), 3),
            "trainable_params": sum(p.numel() for p in params),
            "device": device.type,
            "dtype": str(dtype).removeprefix("torch."),
            "threads": ctx.threads,
        },
    )


def _batch_indices(
    batch_no: int, batch_size: int, n: int, seed: int, orders: dict[int, list[int]]
) -> list[int]:
    """Example indices of one batch. The order within an epoch is a pure function of
    (seed, epoch), so the step number alone positions the data (what resume needs)."""
    out = []
    for k in range(batch_no * batch_size, (batch_no + 1) * batch_size):
        epoch, pos = divmod(k, n)
        if epoch not in orders:
            order = list(range(n))
            random.Random(f"lorajobs-text:{seed}:{epoch}").shuffle(order)
            orders.clear()  # only the current epoch (and the next) are ever needed
            orders[epoch] = order
        out.append(orders[epoch][pos])
    return out


def _pad_batch(
    seqs: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence in the batch; labels are -100 on padding."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        row = torch.tensor(s, dtype=torch.long)
        input_ids[i, : len(s)] = row
        attention_mask[i, : len(s)] = 1
        labels[i, : len(s)] = row
    return input_ids, attention_mask, labels


def loss_curve(losses: list[float], points: int) -> list[float]:
    """Mean loss over up to `points` equal windows of steps: short, and less noisy than samples."""
    n = len(losses)
    k = min(points, n)
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [
        round(sum(losses[a:b]) / (b - a), 6) for a, b in zip(bounds, bounds[1:]) if b > a
    ]


def _canonicalise_peft_folder(out_dir: Path, base_model: str) -> None:
    """Rewrite PEFT's files so that identical tensors give identical bytes."""
    from safetensors import safe_open

    weights = out_dir / ADAPTER_WEIGHTS
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_canonical(tensors, weights, metadata)

    config_path = out_dir / ADAPTER_CONFIG
    config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])  # PEFT keeps a set
    # PEFT records the local folder it loaded from: a temp/cache path that means nothing
    # elsewhere and differs per node. The spec's reference is meaningful and stable.
    config["base_model_name_or_path"] = base_model
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    # PEFT's generated model card names the temp path; the worker writes its own README.md.
    (out_dir / "README.md").unlink(missing_ok=True)
