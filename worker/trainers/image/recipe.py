"""The image trainer: a LoRA on a Stable-Diffusion-style UNet (SD-1.x/2.x or SDXL), and
optionally on its text encoder(s), written as diffusers loads it.

`train` reads top to bottom: threads and seeds → dataset (`data`: layouts, captions, buckets)
→ frozen base model (`models`) → LoRA → work done once (VAE latents per image and flip, cached
on the node and in the bucket; caption embeddings: `latents`), unless the spec makes them vary
per step or trains the text encoders → denoising loop (`TrainLoop` with the `objective`) →
exports: `pytorch_lora_weights.safetensors` (diffusers; byte-for-byte the same for the same spec
and thread count), `<name>.safetensors` (kohya, for A1111 / ComfyUI) and `loss.png`. The
entrypoint writes the model card and sidecar and uploads; this module only trains and exports.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from lorajobs.jobspecs.failures import InvalidInput
from lorajobs.jobspecs.models import ImageJobSpec
from lorajobs.worker.context import TrainOutput, WorkerContext
from lorajobs.worker.plots import draw_loss_curve
from lorajobs.worker.safetensors_io import save_canonical
from lorajobs.worker.trainers.distributed import Gang
from lorajobs.worker.trainers.image.data import ImageTrainSet, build_image_dataset
from lorajobs.worker.trainers.image.kohya import (
    base_model_version,
    diffusers_to_kohya,
    header_metadata,
)
from lorajobs.worker.trainers.image.latents import (
    cache_plan,
)
from lorajobs.worker.trainers.image.models import (
    TEXT_ENCODER_TARGETS,
    ImageBase,
    add_text_encoder_lora,
    freeze,
    load_image_base,
    lora_state,
    save_diffusers,
)
from lorajobs.worker.trainers.image.objective import DenoisingLoss
from lorajobs.worker.trainers.image.parts import (
    LOSS_PNG,
    WEIGHTS_NAME,
    encode_once,
    header_args,
    image_optimizer,
    kohya_name,
    lora_config,
    metrics,
    ready_to_train,
    refuse_unloadable,
    run_loop,
    text_encoder_lr,
    trigger,
)
from lorajobs.worker.trainers.image.samples import SampleRenderer
from lorajobs.worker.trainers.loop import (
    Precision,
    pick_device,
    resolve_precision,
    resolved_settings,
    seed_everything,
    total_steps,
)
from lorajobs.worker.trainers.quantize import refuse_here


def train(
    spec: ImageJobSpec, model_dir: Path, data_dir: Path, out_dir: Path, ctx: WorkerContext
) -> TrainOutput:
    """Train the spec's LoRA on `data_dir` over the base model in `model_dir`, into `out_dir`."""
    from lorajobs.worker.trainers.image.flux import is_flux, refuse_flow_settings

    if is_flux(model_dir):  # recognised by its transformer's config, never by name
        from lorajobs.worker.trainers.image.flux_recipe import train_flux

        if ctx.world_size > 1:
            raise InvalidInput(
                f"resources.gpus {spec.resources.gpus:g}: a Flux base trains on one GPU "
                "(gangs of several run SD / SDXL and text jobs); use gpus: 1"
            )

        return train_flux(spec, model_dir, data_dir, out_dir, ctx)
    refuse_flow_settings(spec)
    return train_unet(spec, model_dir, data_dir, out_dir, ctx)


def train_unet(
    spec: ImageJobSpec, model_dir: Path, data_dir: Path, out_dir: Path, ctx: WorkerContext
) -> TrainOutput:
    """`train` on a Stable-Diffusion-style UNet base (SD 1.x/2.x or SDXL)."""
    cfg = spec.training
    started_at = time.time()
    refuse_unloadable(spec, model_dir)
    # Results depend on the thread count (float reduction order), so it is part of the job.
    torch.set_num_threads(ctx.threads)
    device = pick_device()
    refuse_here(cfg, device)  # a quantized base / 8-bit AdamW: CUDA (and bitsandbytes) or one line
    precision = resolve_precision(cfg.mixed_precision, device)

    # Bad data fails here, before minutes go into loading a model.
    ds = build_image_dataset(data_dir, spec)
    cache = cache_plan(spec)
    base = load_image_base(model_dir)
    freeze(base, device, precision.base_dtype)
    trained, lora_params = _add_lora(spec, base)
    # A gang (several GPUs): each rank trains on its rows of every batch, rank 0 writes.
    gang = Gang.of(ctx)
    renderer = _renderer(spec, model_dir, out_dir, base, trained, precision, device, ctx, gang)
    with gang.rank_zero_first():  # rank 0 fills the node's and the bucket's latent cache
        encoders, latents, embeddings = encode_once(
            ds, cache, base, spec, model_dir, ctx, device, precision.base_dtype
        )
    optimizer = image_optimizer(spec, lora_params, device)
    # Noise and timesteps come from their own CPU generator so they do not depend on the device
    # or on anything else drawing random numbers; the global generator drives LoRA dropout.
    noise_gen = torch.Generator().manual_seed(cfg.seed)
    seed_everything(cfg.seed)
    total = total_steps(cfg, len(ds), batches_per_epoch=ds.steps_per_epoch)
    micro_loss = DenoisingLoss(
        spec, ds, base, cache, encoders, latents, embeddings, noise_gen, device,
        precision.base_dtype,
    )  # fmt: skip
    micro_loss.gang = gang
    gang.reseed(cfg.seed)  # each rank's own LoRA-dropout stream, after the shared init

    # One module for the loop: its trainable parameters are what checkpoints hold. A UNet-only
    # job passes the UNet itself, so its checkpoints keep their parameter names.
    model = base.unet if len(trained) == 1 else torch.nn.ModuleDict(trained)
    result = run_loop(
        spec, model, optimizer, precision, device, ctx, total, noise_gen, micro_loss, renderer,
        gang=gang,
    )  # fmt: skip
    finished_at = time.time()

    files = _export(spec, trained, base, ds, out_dir, total, (started_at, finished_at))
    draw_loss_curve(result.losses, out_dir / LOSS_PNG, title=f"{spec.name}: training loss")
    files.append(LOSS_PNG)
    sample_files, sample_metrics = renderer.finish(total) if renderer else ([], {})
    files += sample_files
    return TrainOutput(
        files=files,
        deterministic=[WEIGHTS_NAME],
        metrics={**metrics(spec, ds, cache, result, total), **sample_metrics},
        resolved=_resolved(spec, base, ds, precision, total, device, ctx, files),
    )


# -- the steps, in the order `train` takes them ------------------------------------------------


def _renderer(
    spec: ImageJobSpec,
    model_dir: Path,
    out_dir: Path,
    base: ImageBase,
    trained: dict[str, Any],
    precision: Precision,
    device: torch.device,
    ctx: WorkerContext,
    gang: Gang,
) -> SampleRenderer | None:
    """Validation grids (`samples:`), rendered by the training modules (the folder is checked
    now); None without samples, and on a gang's other ranks (rank 0 renders them)."""
    if not gang.writer:
        return None
    return SampleRenderer.for_spec(
        spec,
        model_dir,
        out_dir,
        unet=base.unet,
        precision=precision,
        device=device,
        text_encoders={k: m for k, m in trained.items() if k != "unet"},
        board=ctx.board,
    )


def _add_lora(
    spec: ImageJobSpec, base: ImageBase
) -> tuple[dict[str, Any], dict[str, list[torch.nn.Parameter]]]:
    """LoRA on the UNet, and on each text encoder when asked: ({component: module},
    {component: its trainable parameters, in fp32}), each module in train mode."""
    cfg = spec.training
    # LoRA: the UNet's first, then each text encoder's, all from the seeded global generator
    # (the gaussian init draws from it), so a UNet-only job's LoRA is the same with or without
    # the text-encoder code path.
    target_modules = spec.target_modules()
    seed_everything(cfg.seed)
    try:
        base.unet.add_adapter(lora_config(spec.lora, target_modules))
    except ValueError as err:  # PEFT's "Target modules ... not found in the base model"
        raise InvalidInput(f"lora.target_modules {target_modules}: {err}") from None
    trained: dict[str, Any] = {"unet": base.unet}  # diffusers component name → model with LoRA
    if cfg.train_text_encoder:
        for name, te in base.text_encoders.items():
            add_text_encoder_lora(te, lora_config(spec.lora, TEXT_ENCODER_TARGETS))
            trained[name] = te
    lora_params = ready_to_train(trained, "unet", cfg.gradient_checkpointing)
    return trained, lora_params


def _export(
    spec: ImageJobSpec,
    trained: dict[str, Any],
    base: ImageBase,
    ds: ImageTrainSet,
    out_dir: Path,
    total: int,
    times: tuple[float, float],
    adapter: str = "default",
) -> list[str]:
    """The diffusers file (a deterministic header) and, unless DoRA, the kohya file (which adds
    the training times, as the UIs show them). Returns the files written."""
    state: dict[str, torch.Tensor] = {}
    for name, module in trained.items():
        state.update(lora_state(module, name, adapter))
    meta_args = header_args(spec, state, dict(base.unet.config), total, ds)
    save_diffusers(state, trained, out_dir / WEIGHTS_NAME, header_metadata(**meta_args), adapter)
    files = [WEIGHTS_NAME]
    if not spec.lora.use_dora:  # kohya's format has no DoRA magnitudes
        kohya = diffusers_to_kohya(
            state, spec.lora.alpha, spec.lora.use_rslora, base.sdxl, dict(base.unet.config)
        )
        started_at, finished_at = times
        meta = header_metadata(**meta_args, started_at=started_at, finished_at=finished_at)
        save_canonical(kohya, out_dir / kohya_name(spec), {"format": "pt", **meta})
        files.append(kohya_name(spec))
    return files


def _resolved(
    spec: ImageJobSpec,
    base: ImageBase,
    ds: ImageTrainSet,
    precision: Precision,
    total: int,
    device: torch.device,
    ctx: WorkerContext,
    files: list[str],
) -> dict[str, Any]:
    """Every setting the job ran with, defaults resolved (the sidecar's `resolved`)."""
    cfg = spec.training
    return {
        **resolved_settings(spec, precision, total, device, ctx.threads),
        "model_family": base.family,
        "train_text_encoder": cfg.train_text_encoder,
        "text_encoder_learning_rate": text_encoder_lr(spec),
        "text_encoder_target_modules": TEXT_ENCODER_TARGETS if cfg.train_text_encoder else None,
        "resolution": cfg.resolution,
        "noise_offset": cfg.noise_offset,
        "min_snr_gamma": cfg.min_snr_gamma,
        "epochs": round(total * cfg.gradient_accumulation_steps / ds.steps_per_epoch, 3),
        "bucketing": spec.data.bucketing,
        "prediction_type": base.scheduler.config.prediction_type,
        "base_dtype": str(precision.base_dtype).removeprefix("torch."),
        "base_model_version": base_model_version(dict(base.unet.config))[0],
        "kohya_file": kohya_name(spec) if kohya_name(spec) in files else None,
        "trigger_phrase": trigger(spec),
        # A gang's size: each batch is split this many ways (a 1-GPU run records none).
        **({"workers": ctx.world_size} if ctx.world_size > 1 else {}),
    }
