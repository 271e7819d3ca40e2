"""Image jobs trained as one pack: the UNet loads once, each job keeps its own LoRA and loop.

`train_pack` reads like the solo recipe (`image/recipe.py`), once per job where the job owns
the thing (dataset, cached latents and caption embeddings, LoRA, optimizer, noise generator,
seed, steps, export) and once per pack where it is shared (the base pipeline, device,
threads). Each round, the members' noised latents, timesteps and conditioning are
concatenated into one UNet forward pass, each job's LoRA on its own rows (`pack_lora`); each
job's loss is its `DenoisingLoss` on its own rows of the prediction.

Packs take SD / SDXL UNet bases only, at one resolution, without aspect bucketing, text-encoder
training, samples, DoRA or gradient checkpointing (`packable`); the orchestrator's pack key
keeps such jobs alone, and a job that reaches a pack anyway fails alone with one line.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorajobs.jobspecs.failures import InvalidInput, LoraJobsError
from lorajobs.worker.plots import draw_loss_curve
from lorajobs.worker.trainers.image import recipe as solo
from lorajobs.worker.trainers.image.data import build_image_dataset
from lorajobs.worker.trainers.image.latents import cache_plan
from lorajobs.worker.trainers.image.models import freeze, load_image_base
from lorajobs.worker.trainers.image.objective import DenoisingLoss
from lorajobs.worker.trainers.image.parts import (
    LOSS_PNG,
    WEIGHTS_NAME,
    encode_once,
    lora_config,
    metrics,
    refuse_unloadable,
)
from lorajobs.worker.trainers.loop import (
    TrainLoop,
    build_optimizer,
    seed_everything,
    spec_fingerprint,
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


def packable(spec: Any) -> str | None:
    """Why `spec` cannot train in an image pack (the field, one line); None when it can."""
    tr = spec.training
    if tr.train_text_encoder:
        return "training.train_text_encoder: text encoders are not trained in packs"
    if tr.gradient_checkpointing:
        return "training.gradient_checkpointing: not used in packs"
    if spec.lora.use_dora:
        return "lora.use_dora: DoRA adapters are not trained in packs"
    if spec.data.bucketing:
        return "data.bucketing: packed jobs share one resolution"
    if getattr(spec, "samples", None) is not None:
        return "samples: sample grids are not rendered in packs"
    if tr.quantize_base:
        return "training.quantize_base: not used in packs"
    return None


@dataclass
class ImageRows:
    """One member's micro-batch: its tensors on the device and how many rows it adds."""

    loss: DenoisingLoss
    on: dict[str, torch.Tensor]
    counts: dict[str, int]

    @property
    def rows(self) -> int:
        return int(self.on["clean"].shape[0])


@dataclass
class _Job:
    job: PackJob
    ds: Any
    cache: Any
    loss: DenoisingLoss | None = None
    started_at: float = 0.0


def train_pack(
    jobs: list[PackJob], model_dir: Path, on_outcome: OnOutcome | None = None
) -> list[PackOutcome]:
    """Train every job of `jobs` on the one UNet base in `model_dir`; one outcome per job, in
    order. `on_outcome` is called as each job ends (its adapter exported into `out_dir`)."""
    run = PackRun(jobs, on_outcome)
    device, precision = run.device, run.precision
    state = _check(jobs, model_dir, run.end)
    if not state:
        return run.results()
    base = load_image_base(model_dir)
    freeze(base, device, precision.base_dtype)
    pack, names = _add_adapters(base, [s.job for s in state.values()], run.end)
    members = _encode_and_build(base, state, names, model_dir, device, precision, run.end)
    if not members:
        return run.results()
    base.unet.train()
    install(base.unet, pack)
    by_name = {m.name: state[m.job_id] for m in members}
    _seed_rng(pack, members, {n: s.job.spec.training.seed for n, s in by_name.items()})

    def finish(m: Member) -> Any:
        return _finish(by_name[m.name], m, base, precision, device)

    return run.train(members, pack, _forward(base, pack), lambda m: by_name[m.name].job, finish)


def _check(jobs: list[PackJob], model_dir: Path, end: Callable[..., None]) -> dict[str, _Job]:
    """Each job's settings and dataset, by job id; a job that cannot train here (bad data,
    settings a pack does not take, a Flux base) fails alone, before the model loads."""
    from lorajobs.worker.trainers.image.flux import is_flux, refuse_flow_settings

    state: dict[str, _Job] = {}
    flux = is_flux(model_dir)  # recognised by its transformer's config, as solo does
    for job in jobs:
        try:
            why = "base_model: Flux bases are not trained in packs" if flux else packable(job.spec)
            if why is not None:
                raise InvalidInput(f"{why} ({job.spec.base_model}): train this job alone")
            refuse_flow_settings(job.spec)
            refuse_unloadable(job.spec, model_dir)
            ds = build_image_dataset(job.data_path, job.spec)
            state[job.ctx.job_id] = _Job(job, ds, cache_plan(job.spec))
        except LoraJobsError as err:
            end(job, error=err)
    return state


def _forward(base: Any, pack: PackSlices) -> Callable[..., list[tuple[torch.Tensor, dict]]]:
    """One UNet pass over the members' concatenated inputs; each member's loss on its rows."""

    def forward(batches: list[tuple[Member, ImageRows]]) -> list[tuple[torch.Tensor, dict]]:
        args = [b.loss.unet_inputs(b.on) for _, b in batches]
        added = None
        if base.sdxl:
            added = {
                k: torch.cat([a["added_cond_kwargs"][k] for a in args])
                for k in ("text_embeds", "time_ids")
            }
        pred = base.unet(
            torch.cat([a["sample"] for a in args]),
            torch.cat([a["timestep"] for a in args]),
            encoder_hidden_states=torch.cat([a["encoder_hidden_states"] for a in args]),
            added_cond_kwargs=added,
        ).sample
        return [
            (b.loss.loss_of(b.on, rows), b.counts)
            for (_, b), rows in zip(batches, pack.split(pred))
        ]

    return forward


def _add_adapters(
    base: Any, jobs: list[PackJob], end: Callable[..., None]
) -> tuple[PackSlices, dict[str, str]]:
    """One PEFT adapter per job on the UNet, each initialised from the job's seed as the solo
    trainer initialises it (seed, then the gaussian init draws); adapter names by job id."""
    pack, names = PackSlices(), {}
    for i, job in enumerate(jobs):
        name = adapter_name(i)
        targets = job.spec.target_modules()
        seed_everything(job.spec.training.seed)
        try:
            base.unet.add_adapter(lora_config(job.spec.lora, targets), adapter_name=name)
        except ValueError as err:
            end(job, error=InvalidInput(f"lora.target_modules {targets}: {err}"))
            continue
        for _, p in adapter_params(base.unet, name):
            p.data = p.data.float()
        names[job.ctx.job_id] = name
    return pack, names


def _encode_and_build(
    base: Any,
    state: dict[str, _Job],
    names: dict[str, str],
    model_dir: Path,
    device: torch.device,
    precision: Any,
    end: Callable[..., None],
) -> list[Member]:
    """Each job's latents / embeddings (on a copy of the base record, so that freeing the
    encoders after one job's caching leaves them for the next), then its member."""
    members, frees_vae, frees_text = [], True, True
    for job_id, name in names.items():
        s = state[job_id]
        spec, ctx = s.job.spec, s.job.ctx
        s.started_at = time.time()
        mine = copy.copy(base)
        try:
            encoders, latents, embeddings = encode_once(
                s.ds, s.cache, mine, spec, model_dir, ctx, device, precision.base_dtype
            )
        except LoraJobsError as err:
            end(s.job, error=err)
            continue
        frees_vae, frees_text = frees_vae and s.cache.latents, frees_text and s.cache.text
        cfg = spec.training
        noise_gen = torch.Generator().manual_seed(cfg.seed)
        s.loss = DenoisingLoss(
            spec, s.ds, base, s.cache, encoders, latents, embeddings, noise_gen, device,
            precision.base_dtype,
        )  # fmt: skip
        named = adapter_params(base.unet, name)
        loop = TrainLoop(
            cfg,
            model=NamedParams(named),
            optimizer=build_optimizer([p for _, p in named], cfg, device),
            precision=precision,
            device=device,
            ctx=ctx,
            total=total_steps(cfg, len(s.ds), batches_per_epoch=s.ds.steps_per_epoch),
            generators={"noise": noise_gen},
            fingerprint=spec_fingerprint(spec, ctx.threads),
        )
        loss = s.loss

        def batch(k: int, loss: DenoisingLoss = loss) -> ImageRows:
            on, counts = loss.inputs(k)
            return ImageRows(loss, on, counts)

        members.append(Member(name, job_id, loop, batch, s.job.cancelled))
    if frees_vae:  # every job's latents are cached: the VAE is not needed again
        base.vae = None
    if frees_text:
        base.text_encoders = {}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return members


def _seed_rng(pack: PackSlices, members: list[Member], seeds: dict[str, int]) -> None:
    """Each member's dropout generator as solo has it when its loop starts: just seeded."""
    for m in members:
        seed_everything(seeds[m.name])
        keep_rng(pack, m.name)


def _finish(s: _Job, m: Member, base: Any, precision: Any, device: torch.device) -> Any:
    """The solo recipe's ending for one member: exports, loss curve, metrics, settings."""
    from lorajobs.worker.context import TrainOutput

    spec, job, loop = s.job.spec, s.job, m.loop
    result = loop_result(m)
    times = (s.started_at, time.time())
    trained = {"unet": base.unet}
    files = solo._export(spec, trained, base, s.ds, job.out_dir, loop.total, times, m.name)
    draw_loss_curve(result.losses, job.out_dir / LOSS_PNG, title=f"{spec.name}: training loss")
    files.append(LOSS_PNG)
    return TrainOutput(
        files=files,
        deterministic=[WEIGHTS_NAME],
        metrics=metrics(spec, s.ds, s.cache, result, loop.total),
        resolved=solo._resolved(spec, base, s.ds, precision, loop.total, device, job.ctx, files),
    )
