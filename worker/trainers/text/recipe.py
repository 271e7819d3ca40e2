"""Text LoRA trainer: PEFT LoRA on a transformers causal LM, trained on JSONL text.

`train` reads top to bottom: threads + seeds -> tokenizer -> data -> model + LoRA -> train loop
(`TrainLoop`: accumulation, schedule, checkpoints, resume) -> PEFT export made
byte-deterministic, plus `loss.png`. Same spec + same data + same thread count on CPU gives the
same adapter bytes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from lorajobs.jobspecs.failures import UserDataError
from lorajobs.jobspecs.models import TextJobSpec
from lorajobs.worker.context import TrainOutput, WorkerContext
from lorajobs.worker.plots import draw_loss_curve
from lorajobs.worker.safetensors_io import save_canonical
from lorajobs.worker.trainers.distributed import Gang
from lorajobs.worker.trainers.loop import (
    LoopResult,
    Precision,
    build_optimizer,
    loss_curve,
    pick_device,
    resolve_precision,
    resolved_settings,
    seed_everything,
    spec_fingerprint,
    to_device,
    total_steps,
)
from lorajobs.worker.trainers.quantize import (
    lora_to_fp32,
    quantize_linears,
    refuse_here,
    text_load_kwargs,
)
from lorajobs.worker.trainers.text.data import TextTrainSet, build_text_dataset

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LOSS_PNG = "loss.png"
CURVE_POINTS = 20


def train(
    spec: TextJobSpec, model_dir: Path, data_path: Path, out_dir: Path, ctx: WorkerContext
) -> TrainOutput:
    """Train a LoRA for `spec` on the model in `model_dir`; write a PEFT folder into `out_dir`."""
    t_start = time.monotonic()
    tr = spec.training
    # Threads and seeds: the thread count changes float reduction order, so it is fixed per job.
    torch.set_num_threads(ctx.threads)
    seed_everything(tr.seed)
    device = pick_device()
    refuse_here(tr, device)  # a quantized base / 8-bit AdamW: CUDA (and bitsandbytes) or one line
    precision = resolve_precision(tr.mixed_precision, device)

    # Tokenizer, then the data: a bad dataset fails before the (possibly large) model loads.
    tokenizer = _load(spec, model_dir, "tokenizer")
    ds = _dataset(spec, data_path, tokenizer, ctx)
    gang = Gang.of(ctx)
    fsdp = gang.active and tr.distributed == "fsdp"
    # FSDP: rank 0 alone reads the base; the others build it empty (meta) and receive their
    # shards from rank 0 as it is sharded, so a node's host RAM holds one copy, not one a GPU.
    empty = fsdp and gang.rank > 0
    model = _model_with_lora(
        spec, model_dir, device, precision.base_dtype, place=not fsdp, empty=empty
    )
    loaded = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
    # A gang (several GPUs): each rank trains on its share of every batch, with the whole
    # model (DDP) or its shard of it (FSDP, which swaps in sharded parameters: the optimizer
    # is built from them, after).
    net = gang.wrap(model, device, tr.seed, fsdp=fsdp)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, tr, device)

    # Train. Batches (padded, or packed when data.packing) are a pure function of the step.
    total = total_steps(tr, len(ds))

    def micro_loss(k: int) -> tuple[torch.Tensor, dict[str, int]]:
        """The LM loss of micro-batch `k` (its rows: a function of k and the seed)."""
        batch = ds.batch(k, gang.rank, gang.world)
        # A rank's loss: its summed token loss over (the batch's label tokens / ranks).
        share = {"num_items_in_batch": ds.label_tokens(k) / gang.world} if gang.active else {}
        out = net(**to_device(batch.model_inputs(), device), use_cache=False, **share)
        counts = {
            "tokens": batch.num_tokens,
            "label_tokens": batch.num_label_tokens,
            "capacity": batch.capacity,
        }
        return gang.global_loss(out.loss, counts)

    loop = gang.loop(
        tr,
        ctx,
        wrapped=net,
        model=model,
        optimizer=optimizer,
        precision=precision,
        device=device,
        total=total,
        generators={},
        fingerprint=gang.fingerprint(spec_fingerprint(spec, ctx.threads)),
    )
    result = loop.run(micro_loss)
    eval_loss = _eval_loss(model, ds, device, precision) if ds.validation else None
    if eval_loss is not None and ctx.board is not None:
        ctx.board.scalar("eval/loss", eval_loss, total)

    _export(spec, model, out_dir, total, state=gang.full_state(model))
    draw_loss_curve(result.losses, out_dir / LOSS_PNG, title=f"{spec.name}: training loss")
    metrics = _metrics(spec, ds, result, total, eval_loss)
    metrics["total_seconds"] = round(time.monotonic() - t_start, 3)
    if gang.active:  # what this worker read of the model into host memory
        metrics["model_bytes_loaded"] = loaded
    return TrainOutput(
        files=[ADAPTER_CONFIG, ADAPTER_WEIGHTS, LOSS_PNG],
        deterministic=[ADAPTER_CONFIG, ADAPTER_WEIGHTS],
        metrics=metrics,
        resolved=_resolved(spec, ds, precision, total, device, ctx, params, model),
    )


# -- the steps, in the order `train` takes them ------------------------------------------------


def _load(spec: TextJobSpec, model_dir: Path, what: str, **kwargs: Any) -> Any:
    """The base model's tokenizer or model, from the pulled folder only; one line if not."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise UserDataError(
            f"base model {spec.base_model}: no config.json (not a transformers model folder)"
        )
    cls = AutoTokenizer if what == "tokenizer" else AutoModelForCausalLM
    try:
        return cls.from_pretrained(model_dir, local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        raise UserDataError(
            f"base model {spec.base_model}: cannot load: {_first_line(err)}"
        ) from None


def _dataset(
    spec: TextJobSpec, data_path: Path, tokenizer: Any, ctx: WorkerContext
) -> TextTrainSet:
    """The tokenised training set (and the validation set it names or splits off)."""
    validation_path = None
    if spec.data.validation is not None:
        from lorajobs.storage.pull import pull_dataset

        validation_path = pull_dataset(spec.data.validation, ctx.cache_dir)
    return build_text_dataset(data_path, spec, tokenizer, validation_path=validation_path)


def _model_with_lora(
    spec: TextJobSpec,
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    place: bool = True,
    empty: bool = False,
) -> Any:
    """The frozen base model with the spec's LoRA on it, in train mode: on `device`, or left on
    the host (`place=False`) for FSDP to move there shard by shard; `empty`: built on the meta
    device without reading a weight (FSDP fills it from rank 0's)."""
    from peft import LoraConfig, get_peft_model

    quant = spec.training.quantize_base
    model = _empty_base(model_dir, dtype) if empty else _base_model(spec, model_dir, device, dtype)
    model.config.use_cache = False  # no KV cache while training: it only costs memory
    if quant in ("nf4", "int8"):
        from peft import prepare_model_for_kbit_training

        # QLoRA's usual preparation: norms in fp32, input grads, checkpointing if asked.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=spec.training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif spec.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # frozen embeddings: give checkpoints a grad path
    lora_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=spec.lora.rank,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=spec.target_modules(),
        use_dora=spec.lora.use_dora,
        use_rslora=spec.lora.use_rslora,
    )
    try:
        model = get_peft_model(model, lora_config)
    except ValueError as err:  # e.g. target modules that this model does not have
        raise UserDataError(f"base model {spec.base_model}: {err}") from None
    if place and quant not in ("nf4", "int8"):  # bitsandbytes placed it on the GPU as it loaded
        model.to(device)  # a device move only: a dtype cast would undo fp8
    if quant:
        lora_to_fp32(model)  # the adapter trains (and is saved) unquantized, in fp32
    model.train()
    return model


def _empty_base(model_dir: Path, dtype: torch.dtype) -> Any:
    """The base's architecture from its config.json, on the meta device: no weight read, no
    memory taken (rank 0 reads the folder and reports any problem with it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, torch_dtype=dtype)


def _base_model(
    spec: TextJobSpec, model_dir: Path, device: torch.device, dtype: torch.dtype
) -> Any:
    """The frozen base: as stored (in `dtype`), or quantized on the GPU (`quantize_base`)."""
    quant = spec.training.quantize_base
    if quant in ("nf4", "int8"):
        return _load(spec, model_dir, "model", **text_load_kwargs(quant, device))
    model = _load(spec, model_dir, "model", dtype=dtype)
    if quant == "fp8":
        model.requires_grad_(False)
        quantize_linears(model, "fp8", device, keep=lambda name: name.endswith("lm_head"))
    return model


def _export(
    spec: TextJobSpec,
    model: Any,
    out_dir: Path,
    total: int,
    adapter: str = "default",
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """PEFT's folder, then rewritten so the bytes depend only on the tensors.

    `adapter` names one of several adapters in `model` (a pack's): PEFT saves a non-default
    adapter into a subfolder of that name, whose files are moved up. `state`: the LoRA's whole
    tensors where the model holds only shards of them (FSDP).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, selected_adapters=[adapter], state_dict=state)
    if adapter != "default":
        for f in (out_dir / adapter).iterdir():
            f.replace(out_dir / f.name)
        (out_dir / adapter).rmdir()
    model_type = str(getattr(model.config, "model_type", "causal-lm"))
    header = {  # the kohya / modelspec keys that apply to a text LoRA; no times: deterministic
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{model_type}/lora",
        "modelspec.implementation": "https://github.com/huggingface/peft",
        "modelspec.title": spec.name,
        "ss_base_model_version": model_type,
        "ss_network_dim": str(spec.lora.rank),
        "ss_network_alpha": repr(float(spec.lora.alpha)),
        "ss_output_name": spec.name,
        "ss_steps": str(total),
        "ss_seed": str(spec.training.seed),
        "ss_learning_rate": repr(float(spec.training.learning_rate)),
    }
    _canonicalise_peft_folder(out_dir, spec.base_model, header)


def _metrics(
    spec: TextJobSpec, ds: TextTrainSet, result: LoopResult, total: int, eval_loss: float | None
) -> dict[str, Any]:
    tr, losses, counters = spec.training, result.losses, result.counters
    return {
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "loss_curve": loss_curve(losses, CURVE_POINTS),
        "steps": total,
        "examples": len(ds.examples),
        "validation_examples": len(ds.validation),
        "eval_loss": eval_loss,
        "examples_seen": total * tr.batch_size * tr.gradient_accumulation_steps,
        "tokens": counters.get("tokens", 0),
        "label_tokens": counters.get("label_tokens", 0),
        # Real tokens / tokens computed: what padding wastes (packing brings it near 1).
        "useful_fraction": round(
            counters.get("tokens", 0) / max(1, counters.get("capacity", 0)), 4
        ),
        "resumed_from_step": result.resumed_from_step,
        "train_seconds": round(result.train_seconds, 3),
    }


def _resolved(
    spec: TextJobSpec,
    ds: TextTrainSet,
    precision: Precision,
    total: int,
    device: torch.device,
    ctx: WorkerContext,
    params: list[Any],
    model: Any = None,
) -> dict[str, Any]:
    """Every setting the job ran with, defaults resolved (the sidecar's `resolved`)."""
    tr = spec.training
    return {
        **resolved_settings(spec, precision, total, device, ctx.threads),
        "max_seq_length": tr.max_seq_length,
        "epochs": round(total * tr.batch_size * tr.gradient_accumulation_steps / len(ds), 3),
        "packing": spec.data.packing,
        "data_format": spec.data.format,
        "trainable_params": sum(p.numel() for p in params),
        "dtype": str(precision.base_dtype).removeprefix("torch."),
        # A gang's size: its batches are split this many ways (a 1-GPU run records none), and
        # how it held the model (FSDP: each worker holds `params_per_worker` of the elements).
        **(_gang_settings(spec, model, ctx) if ctx.world_size > 1 else {}),
    }


def _gang_settings(spec: TextJobSpec, model: Any, ctx: WorkerContext) -> dict[str, Any]:
    every = sum(p.numel() for p in model.parameters())
    held = sum(_local(p).numel() for p in model.parameters())
    return {
        "workers": ctx.world_size,
        "distributed": spec.training.distributed,
        "params_per_worker": held,
        "params_total": every,
    }


def _local(p: Any) -> Any:
    """The part of parameter `p` this process holds (its shard, under FSDP)."""
    return p.to_local() if hasattr(p, "to_local") else p


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


@torch.no_grad()
def _eval_loss(model: Any, ds: TextTrainSet, device: torch.device, precision: Any) -> float:
    """Mean loss per label token over the validation set (dropout off; draws no random)."""
    model.eval()
    total = weight = 0.0
    for batch in ds.eval_batches():
        with precision.context(device):
            loss = model(**to_device(batch.model_inputs(), device), use_cache=False).loss
        total += float(loss) * batch.num_label_tokens
        weight += batch.num_label_tokens
    model.train()
    return round(total / max(weight, 1.0), 6)


def _canonicalise_peft_folder(out_dir: Path, base_model: str, header: dict[str, str]) -> None:
    """Rewrite PEFT's files so that identical tensors give identical bytes."""
    from safetensors import safe_open

    from lorajobs.worker.trainers.image.kohya import tensor_data_sha256

    weights = out_dir / ADAPTER_WEIGHTS
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header = {**header, "modelspec.hash_sha256": "0x" + tensor_data_sha256(tensors)}
    save_canonical(tensors, weights, {**metadata, **header})

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
