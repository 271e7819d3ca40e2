"""Text jobs trained as one pack: the base loads once, each job keeps its own LoRA and loop.

`train_pack` reads like the solo recipe (`text/recipe.py`), once per job where the job owns
the thing (data, LoRA, optimizer, seed, steps, export) and once per pack where it is shared
(tokenizer, base model, device, threads). Each round, the members' padded batches are padded
further to one length, concatenated and run through the model in one forward pass; each
job's loss is taken from its own rows, cropped back to its own length (the solo shapes).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lorajobs.jobspecs.failures import LoraJobsError, UserDataError
from lorajobs.worker.plots import draw_loss_curve
from lorajobs.worker.trainers.loop import (
    TrainLoop,
    build_optimizer,
    seed_everything,
    spec_fingerprint,
    to_device,
    total_steps,
)
from lorajobs.worker.trainers.pack import (
    Member,
    OnOutcome,
    PackJob,
    PackOutcome,
    PackRun,
    adapter_name,
    keep_rng,
    loop_result,
)
from lorajobs.worker.trainers.pack_lora import NamedParams, PackSlices, adapter_params, install
from lorajobs.worker.trainers.text import recipe as solo
from lorajobs.worker.trainers.text.pack_attention import install_attention
from lorajobs.worker.trainers.text.packing import TextBatch


def train_pack(
    jobs: list[PackJob], model_dir: Path, on_outcome: OnOutcome | None = None
) -> list[PackOutcome]:
    """Train every job of `jobs` on the one base in `model_dir`; one outcome per job, in order.

    `on_outcome` is called as each job ends (a finished job's adapter is exported into its
    `out_dir` first), while the others may still be training.
    """
    run = PackRun(jobs, on_outcome)
    device, precision = run.device, run.precision
    tokenizer = solo._load(jobs[0].spec, model_dir, "tokenizer")
    data: dict[str, Any] = {}
    for job in jobs:  # a job with bad data fails alone, before the model loads
        try:
            data[job.ctx.job_id] = solo._dataset(job.spec, job.data_path, tokenizer, job.ctx)
        except LoraJobsError as err:
            run.end(job, error=err)
    model, pack, names = _model_with_adapters(
        [j for j in jobs if j.ctx.job_id in data], model_dir, precision.base_dtype, run.end
    )
    if model is None:
        return run.results()
    model.to(device)
    model.train()
    install(model, pack)
    install_attention(model.get_base_model(), pack)
    inner = model.get_base_model()
    pad_id = next(iter(data.values())).pad_id
    members: list[Member] = []
    by_name: dict[str, tuple[PackJob, Any]] = {}
    for job in jobs:
        name = names.get(job.ctx.job_id)
        if name is None:
            continue
        ds = data[job.ctx.job_id]
        members.append(_member(job, name, ds, model, precision, device))
        by_name[name] = (job, ds)

    def finish(m: Member) -> Any:
        job, ds = by_name[m.name]
        return _finish(job, m, ds, model, pack, precision, device)

    forward = _pack_forward(model, pack, inner, pad_id, device)
    return run.train(members, pack, forward, lambda m: by_name[m.name][0], finish)


def _pack_forward(
    model: Any, pack: PackSlices, inner: Any, pad_id: int, device: torch.device
) -> Callable[[list[tuple[Member, TextBatch]]], list[tuple[torch.Tensor, dict[str, int]]]]:
    """One forward over the members' concatenated batches; each member's loss on its own rows,
    cut back to its own length (the solo shape)."""

    def forward(
        batches: list[tuple[Member, TextBatch]],
    ) -> list[tuple[torch.Tensor, dict[str, int]]]:
        inputs = _concatenate([b for _, b in batches], pad_id)
        logits = model(**to_device(inputs, device), use_cache=False).logits
        out = []
        for (_, b), rows in zip(batches, pack.split(logits)):
            own = rows[:, : b.input_ids.shape[1]].contiguous()  # the solo shape
            labels = to_device({"labels": b.labels}, device)["labels"]
            loss = inner.loss_function(
                logits=own, labels=labels, vocab_size=inner.config.vocab_size
            )
            counts = {
                "tokens": b.num_tokens,
                "label_tokens": b.num_label_tokens,
                "capacity": b.capacity,
            }
            out.append((loss, counts))
        return out

    return forward


def _model_with_adapters(
    jobs: list[PackJob], model_dir: Path, dtype: torch.dtype, end: Callable[..., None]
) -> tuple[Any, PackSlices, dict[str, str]]:
    """The base once, with one PEFT adapter per job, each initialised from the job's seed as
    the solo trainer initialises it; the adapter names by job id."""
    from peft import get_peft_model

    pack, names, model = PackSlices(), {}, None
    if not jobs:
        return None, pack, names
    base = solo._load(jobs[0].spec, model_dir, "model", dtype=dtype)
    base.config.use_cache = False
    for i, job in enumerate(jobs):
        name = adapter_name(i)
        seed_everything(job.spec.training.seed)  # as solo: the seed, then LoRA init draws
        try:
            config = _lora_config(job.spec)
            if model is None:
                model = get_peft_model(base, config, adapter_name=name)
            else:
                model.add_adapter(name, config)
        except ValueError as err:
            end(job, error=UserDataError(f"base model {job.spec.base_model}: {err}"))
            continue
        keep_rng(pack, name)
        names[job.ctx.job_id] = name
    return model, pack, names


def _lora_config(spec: Any) -> Any:
    from peft import LoraConfig

    if spec.lora.use_dora:
        raise ValueError("lora.use_dora: DoRA adapters are not trained in packs")
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=spec.lora.rank,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=spec.target_modules(),
        use_rslora=spec.lora.use_rslora,
    )


def _member(
    job: PackJob, name: str, ds: Any, model: Any, precision: Any, device: torch.device
) -> Member:
    tr = job.spec.training
    named = adapter_params(model, name)
    optimizer = build_optimizer([p for _, p in named], tr, device)
    loop = TrainLoop(
        tr,
        model=NamedParams(named),
        optimizer=optimizer,
        precision=precision,
        device=device,
        ctx=job.ctx,
        total=total_steps(tr, len(ds)),
        generators={},
        fingerprint=spec_fingerprint(job.spec, job.ctx.threads),
    )
    return Member(name, job.ctx.job_id, loop, ds.batch, job.cancelled)


def _concatenate(batches: list[TextBatch], pad_id: int) -> dict[str, torch.Tensor]:
    """The members' batches end to end, right-padded to the longest (no loss, no attention)."""
    width = max(b.input_ids.shape[1] for b in batches)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    out = {"input_ids": torch.cat([pad(b.input_ids, pad_id) for b in batches])}
    if all(b.attention_mask is not None for b in batches):
        out["attention_mask"] = torch.cat([pad(b.attention_mask, 0) for b in batches])  # type: ignore[arg-type]
    else:  # packed rows: padding gets its own position run, as `collate_packed` gives it
        pos = []
        for b in batches:
            assert b.position_ids is not None
            extra = torch.arange(width - b.position_ids.shape[1], dtype=b.position_ids.dtype)
            pos.append(torch.cat([b.position_ids, extra.expand(b.position_ids.shape[0], -1)], 1))
        out["position_ids"] = torch.cat(pos)
    return out


def _finish(
    job: PackJob, m: Member, ds: Any, model: Any, pack: PackSlices, precision: Any, device: Any
) -> Any:
    """The solo recipe's ending for one member: eval loss, export, loss curve, metrics."""
    from lorajobs.worker.context import TrainOutput

    spec, loop = job.spec, m.loop
    result = loop_result(m)
    saved = pack.slices, pack.widths
    pack.alone(m.name)
    try:
        eval_loss = solo._eval_loss(model, ds, device, precision) if ds.validation else None
        solo._export(spec, model, job.out_dir, loop.total, adapter=m.name)
    finally:
        pack.slices, pack.widths = saved
    if eval_loss is not None and job.ctx.board is not None:
        job.ctx.board.scalar("eval/loss", eval_loss, loop.total)
    draw_loss_curve(result.losses, job.out_dir / solo.LOSS_PNG, title=f"{spec.name}: training loss")
    metrics = solo._metrics(spec, ds, result, loop.total, eval_loss)
    params = [p for _, p in adapter_params(model, m.name)]
    resolved = solo._resolved(spec, ds, precision, loop.total, device, job.ctx, params)
    return TrainOutput(
        files=[solo.ADAPTER_CONFIG, solo.ADAPTER_WEIGHTS, solo.LOSS_PNG],
        deterministic=[solo.ADAPTER_CONFIG, solo.ADAPTER_WEIGHTS],
        metrics=metrics,
        resolved=resolved,
    )
