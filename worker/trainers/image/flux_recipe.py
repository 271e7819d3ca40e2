"""The image trainer on a Flux.1 base (dev or schnell): a LoRA on the transformer, and
optionally on the CLIP text encoder, written as diffusers and kohya / ComfyUI load it.

`train_flux` reads like `recipe.train`, whose steps it shares (data, caching, optimizer, loop,
metrics): dataset → frozen base (`flux.load_flux_models`) → LoRA → work done once (VAE latents
per image and flip, T5 + CLIP prompt embeddings per caption; the text encoders, T5 above all,
are then released) → flow-matching loop (`flux.FlowMatchLoss`) → exports:
`pytorch_lora_weights.safetensors` (`transformer.` keys, PEFT naming, as
`FluxPipeline.save_lora_weights` writes; byte-for-byte the same for the same spec and thread
count) and `<name>.safetensors` in kohya naming (`flux_names`).
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
from lorajobs.worker.trainers.image import parts
from lorajobs.worker.trainers.image.data import build_image_dataset
from lorajobs.worker.trainers.image.flux import (
    FlowMatchLoss,
    FluxBase,
    FluxEncoders,
    check_flux_spec,
    cudnn_attention_off,
    default_targets,
    freeze_flux,
    load_flux_models,
    t5_length,
)
from lorajobs.worker.trainers.image.flux_names import exportable, flux_to_kohya, linear_widths
from lorajobs.worker.trainers.image.flux_samples import FluxSampleRenderer
from lorajobs.worker.trainers.image.kohya import (
    diffusers_to_kohya,
    header_metadata,
)
from lorajobs.worker.trainers.image.latents import cache_plan
from lorajobs.worker.trainers.image.models import (
    TEXT_ENCODER_TARGETS,
    add_text_encoder_lora,
    lora_state,
    save_diffusers,
)
from lorajobs.worker.trainers.loop import (
    pick_device,
    resolve_precision,
    resolved_settings,
    seed_everything,
    total_steps,
)
from lorajobs.worker.trainers.quantize import (
    lora_to_fp32,
    quantize_flux_transformer,
    refuse_here,
)

WEIGHTS_NAME = parts.WEIGHTS_NAME


def train_flux(
    spec: ImageJobSpec, model_dir: Path, data_dir: Path, out_dir: Path, ctx: WorkerContext
) -> TrainOutput:
    """Train the spec's LoRA over the Flux.1 base in `model_dir`, into `out_dir`."""
    with cudnn_attention_off():  # for this job only: the next one on this worker gets it back
        return _train_flux(spec, model_dir, data_dir, out_dir, ctx)


def _train_flux(
    spec: ImageJobSpec, model_dir: Path, data_dir: Path, out_dir: Path, ctx: WorkerContext
) -> TrainOutput:
    cfg = spec.training
    started_at = time.time()
    parts.refuse_unloadable(spec, model_dir)
    torch.set_num_threads(ctx.threads)
    device = pick_device()
    refuse_here(cfg, device)  # a quantized base / 8-bit AdamW: CUDA (and bitsandbytes) or one line
    precision = resolve_precision(cfg.mixed_precision, device)

    ds = build_image_dataset(data_dir, spec)
    cache = cache_plan(spec)
    base = load_flux_models(model_dir)
    guidance = check_flux_spec(spec, base)
    freeze_flux(base, device, precision.base_dtype)
    if cfg.quantize_base:  # after the cast (a cast would undo fp8), before the LoRA wraps it
        quantize_flux_transformer(base.transformer, cfg.quantize_base, device)
    targets = list(spec.lora.target_modules or default_targets(dict(base.transformer.config)))
    trained, lora_params = _add_lora(spec, base, targets)
    if cfg.quantize_base:
        lora_to_fp32(base.transformer)  # PEFT gives a LoRA its base layer's dtype
    # Before the text encoders go: a renderer embeds its prompts now when they will be released.
    renderer = FluxSampleRenderer.for_flux(
        spec, model_dir, out_dir, trained, precision, device, ctx, guidance,
        FluxEncoders(base, device, precision.base_dtype) if cache.text else None,
    )  # fmt: skip
    encoders, latents, embeddings = parts.encode_once(
        ds, cache, base, spec, model_dir, ctx, device, precision.base_dtype, FluxEncoders
    )
    optimizer = parts.image_optimizer(spec, lora_params, device)
    noise_gen = torch.Generator().manual_seed(cfg.seed)
    seed_everything(cfg.seed)
    total = total_steps(cfg, len(ds), batches_per_epoch=ds.steps_per_epoch)
    micro_loss = FlowMatchLoss(
        spec, ds, base, cache, encoders, latents, embeddings, noise_gen, device,
        precision.base_dtype, guidance,
    )  # fmt: skip
    model = base.transformer if len(trained) == 1 else torch.nn.ModuleDict(trained)
    result = parts.run_loop(
        spec, model, optimizer, precision, device, ctx, total, noise_gen, micro_loss, renderer
    )
    finished_at = time.time()

    files, kohya_skipped = _export(
        spec, trained, base, ds, out_dir, total, (started_at, finished_at)
    )
    draw_loss_curve(result.losses, out_dir / parts.LOSS_PNG, title=f"{spec.name}: training loss")
    files.append(parts.LOSS_PNG)
    sample_files, sample_metrics = renderer.finish(total) if renderer else ([], {})
    files += sample_files
    resolved = _resolved(spec, base, ds, precision, total, device, ctx, files, targets, guidance)
    resolved["kohya_skipped"] = kohya_skipped
    return TrainOutput(
        files=files,
        deterministic=[WEIGHTS_NAME],
        metrics={**parts.metrics(spec, ds, cache, result, total), **sample_metrics},
        resolved=resolved,
    )


def _resolved(
    spec: ImageJobSpec,
    base: FluxBase,
    ds: Any,
    precision: Any,
    total: int,
    device: torch.device,
    ctx: WorkerContext,
    files: list[str],
    targets: list[str],
    guidance: float | None,
) -> dict[str, Any]:
    """Every setting the job ran with, defaults resolved (the sidecar's `resolved`)."""
    cfg = spec.training
    return {
        **resolved_settings(spec, precision, total, device, ctx.threads),
        "model_family": base.family,
        "target_modules": targets,
        "train_text_encoder": cfg.train_text_encoder,
        "text_encoder_learning_rate": parts.text_encoder_lr(spec),
        "text_encoder_target_modules": TEXT_ENCODER_TARGETS if cfg.train_text_encoder else None,
        "resolution": cfg.resolution,
        "objective": "flow_matching",
        "timestep_sampling": cfg.timestep_sampling,
        "logit_mean": cfg.logit_mean,
        "logit_std": cfg.logit_std,
        "guidance_scale": guidance,
        "t5_max_length": t5_length(base.tokenizers[1]),
        "epochs": round(total * cfg.gradient_accumulation_steps / ds.steps_per_epoch, 3),
        "bucketing": spec.data.bucketing,
        "base_dtype": str(precision.base_dtype).removeprefix("torch."),
        "base_model_version": "flux1",
        "kohya_file": parts.kohya_name(spec) if parts.kohya_name(spec) in files else None,
        "trigger_phrase": parts.trigger(spec),
    }


def _add_lora(
    spec: ImageJobSpec, base: FluxBase, targets: list[str]
) -> tuple[dict[str, Any], dict[str, list[torch.nn.Parameter]]]:
    """LoRA on the transformer, and on the CLIP text encoder when asked (T5 never trains:
    its embeddings stay cacheable); each trained module in train mode, its LoRA in fp32."""
    cfg = spec.training
    seed_everything(cfg.seed)  # the gaussian LoRA init draws from the global generator
    try:
        base.transformer.add_adapter(parts.lora_config(spec.lora, targets))
    except ValueError as err:
        raise InvalidInput(f"lora.target_modules {targets}: {err}") from None
    trained: dict[str, Any] = {"transformer": base.transformer}
    if cfg.train_text_encoder:
        clip = base.text_encoders["text_encoder"]
        add_text_encoder_lora(clip, parts.lora_config(spec.lora, TEXT_ENCODER_TARGETS))
        trained["text_encoder"] = clip
    lora_params = parts.ready_to_train(trained, "transformer", cfg.gradient_checkpointing)
    return trained, lora_params


def transformer_lora_state(transformer: Any) -> dict[str, torch.Tensor]:
    """The transformer's LoRA as `FluxPipeline.save_lora_weights` names it:
    `transformer.<module>.lora_{A,B}.weight`, fp32 on the CPU."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer)
    return {f"transformer.{k}": v.detach().to("cpu", torch.float32) for k, v in state.items()}


def _export(
    spec: ImageJobSpec,
    trained: dict[str, Any],
    base: FluxBase,
    ds: Any,
    out_dir: Path,
    total: int,
    times: tuple[float, float],
) -> tuple[list[str], str | None]:
    """The diffusers file and, where every module has a kohya name and it is no DoRA, the
    kohya file. Returns (files written, why the kohya file was skipped or None)."""
    lora = spec.lora
    state = transformer_lora_state(base.transformer)
    if "text_encoder" in trained:
        state.update(lora_state(trained["text_encoder"], "text_encoder"))
    meta_args = parts.header_args(spec, state, dict(base.transformer.config), total, ds)
    save_diffusers(state, trained, out_dir / WEIGHTS_NAME, header_metadata(**meta_args))
    files = [WEIGHTS_NAME]
    skipped = "DoRA has no kohya form" if lora.use_dora else None
    unnamed = exportable(state)
    if unnamed is not None:
        skipped = f"{unnamed} has no kohya / ComfyUI name"
    if skipped is None:
        kohya = flux_to_kohya(
            {k: v for k, v in state.items() if k.startswith("transformer.")},
            lora.rank,
            lora.alpha,
            lora.use_rslora,
            linear_widths(base.transformer),
        )
        te = {k: v for k, v in state.items() if k.startswith("text_encoder.")}
        if te:  # kohya's Flux files name CLIP `lora_te1_`
            kohya.update(diffusers_to_kohya(te, lora.alpha, lora.use_rslora, sdxl=True))
        started_at, finished_at = times
        meta = header_metadata(**meta_args, started_at=started_at, finished_at=finished_at)
        save_canonical(kohya, out_dir / parts.kohya_name(spec), {"format": "pt", **meta})
        files.append(parts.kohya_name(spec))
    return files, skipped
