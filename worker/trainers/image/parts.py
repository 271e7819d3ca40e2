"""Steps the image trainers share (the UNet's `recipe` and Flux's `flux_recipe`): refusing a
base that cannot load, the LoRA config, the work done once (latents and caption embeddings), the
optimizer, the metrics and a few names. Apart from both so that neither imports the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lorajobs.jobspecs.failures import InvalidInput
from lorajobs.jobspecs.models import ImageJobSpec, LoraSettings
from lorajobs.worker.context import WorkerContext
from lorajobs.worker.trainers.distributed import Gang
from lorajobs.worker.trainers.image.data import ImageTrainSet
from lorajobs.worker.trainers.image.kohya import tensor_data_sha256
from lorajobs.worker.trainers.image.latents import (
    CachePlan,
    encode_captions,
    encode_latents,
)
from lorajobs.worker.trainers.image.models import (
    Conditioning,
    Encoders,
    ImageBase,
    checkpoint_text_encoder,
)
from lorajobs.worker.trainers.loop import (
    LoopResult,
    Precision,
    build_optimizer,
    spec_fingerprint,
    window_means,
)

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
LOSS_PNG = "loss.png"


def refuse_unloadable(spec: ImageJobSpec, model_dir: Path) -> None:
    if spec.training.quantize_base and (model_dir / "unet" / "config.json").is_file():
        # The spec cannot tell a Flux base from a UNet one; the pulled folder can.
        raise InvalidInput(
            f"training.quantize_base: only Flux bases are quantized; {spec.base_model} is a "
            "UNet pipeline (SD / SDXL): drop quantize_base"
        )
    if spec.training.train_text_encoder and spec.lora.use_dora:
        # transformers' adapter loader (which diffusers' load_lora_weights uses for text
        # encoders) drops DoRA magnitudes: the adapter would not load back as trained.
        raise InvalidInput(
            "lora.use_dora: DoRA text-encoder weights do not load back into diffusers "
            "pipelines; use plain LoRA with training.train_text_encoder, or train the UNet only"
        )


def ready_to_train(
    trained: dict[str, Any], denoiser: str, gradient_checkpointing: bool
) -> dict[str, list[torch.nn.Parameter]]:
    """Each trained module's LoRA parameters, made fp32 (the optimizer steps them at full
    precision whatever the base's dtype); gradient checkpointing where asked (the denoiser,
    named `denoiser` in `trained`, by diffusers' own switch; text encoders by ours); train
    mode."""
    params = {n: [p for p in m.parameters() if p.requires_grad] for n, m in trained.items()}
    for group in params.values():
        for p in group:
            p.data = p.data.float()
    for name, module in trained.items():
        if gradient_checkpointing:
            if name == denoiser:
                module.enable_gradient_checkpointing()
            else:
                checkpoint_text_encoder(module)
        module.train()
    return params


def header_args(
    spec: ImageJobSpec, state: dict[str, torch.Tensor], config: dict[str, Any], steps: int,
    ds: Any,
) -> dict[str, Any]:  # fmt: skip
    """What both image recipes put in an adapter file's header (`kohya.header_metadata`);
    `config`: the denoiser's (UNet's or transformer's) config."""
    cfg, lora = spec.training, spec.lora
    return dict(
        name=spec.name,
        rank=lora.rank,
        alpha=lora.alpha,
        use_rslora=lora.use_rslora,
        unet_config=config,
        steps=steps,
        seed=cfg.seed,
        learning_rate=cfg.learning_rate,
        resolution=cfg.resolution,
        captions=[r.caption for r in ds.records],
        dataset=spec.dataset,
        trigger=trigger(spec),
        tensors_sha256=tensor_data_sha256(state),
        text_encoder_lr=text_encoder_lr(spec),
    )


def lora_config(lora: LoraSettings, target_modules: list[str]) -> Any:
    """The spec's LoRA settings on `target_modules`."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_modules,
        init_lora_weights="gaussian",
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
    )


def encode_once(
    ds: ImageTrainSet,
    cache: CachePlan,
    base: ImageBase,
    spec: ImageJobSpec,
    model_dir: Path,
    ctx: WorkerContext,
    device: torch.device,
    dtype: torch.dtype,
    make_encoders: Any = Encoders,
) -> tuple[Encoders, dict[tuple[int, bool], torch.Tensor] | None, dict[str, Conditioning]]:
    """Work done once: VAE latents per (image, flip) and caption embeddings per caption, unless
    the spec makes them vary per step (random crop; caption dropout / tag shuffling; a text
    encoder that trains). What is cached is freed from the device for the loop."""
    encoders = make_encoders(base, device, dtype)
    latents = encode_latents(ds, cache, encoders, spec, model_dir, ctx) if cache.latents else None
    embeddings = encode_captions(ds, spec, encoders) if cache.text else {}
    if cache.latents:
        encoders.vae = base.vae = None  # not needed again: free the memory for the loop
    if cache.text:
        encoders.text_encoders = None
        base.text_encoders = {}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return encoders, latents, embeddings


def image_optimizer(
    spec: ImageJobSpec, lora_params: dict[str, list[torch.nn.Parameter]], device: torch.device
) -> Any:
    """AdamW over the LoRA parameters; the text encoders' with their own peak LR."""
    cfg = spec.training
    if not cfg.train_text_encoder:
        (params,) = lora_params.values()  # the denoiser's: the UNet's or Flux's transformer's
        return build_optimizer(params, cfg, device)
    te_lr = cfg.text_encoder_learning_rate or cfg.learning_rate
    return build_optimizer(
        [
            {
                "params": ps,
                "peak_lr": te_lr if name.startswith("text_encoder") else cfg.learning_rate,
            }
            for name, ps in lora_params.items()
        ],
        cfg,
        device,
    )


def metrics(
    spec: ImageJobSpec, ds: ImageTrainSet, cache: CachePlan, result: LoopResult, total: int
) -> dict[str, Any]:
    cfg, losses = spec.training, result.losses
    curve_every = max(1, total // 50)
    return {
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "loss_curve": window_means(losses, curve_every),
        "loss_curve_every": curve_every,
        "steps": total,
        "images": len(ds.records),
        "items_per_epoch": len(ds),
        "images_seen": total * cfg.batch_size * cfg.gradient_accumulation_steps,
        "latents_cached": cache.latents,
        "text_cached": cache.text,
        "resumed_from_step": result.resumed_from_step,
        "train_seconds": result.train_seconds,
    }


def text_encoder_lr(spec: ImageJobSpec) -> float | None:
    cfg = spec.training
    return (cfg.text_encoder_learning_rate or cfg.learning_rate) if cfg.train_text_encoder else None


def kohya_name(spec: ImageJobSpec) -> str:
    return f"{spec.name}.safetensors"


def trigger(spec: ImageJobSpec) -> str | None:
    """The trigger word of the spec's `data:` section, where it has one."""
    data = getattr(spec, "data", None)
    return getattr(data, "trigger_word", None) if data is not None else None


def run_loop(
    spec: ImageJobSpec,
    model: torch.nn.Module,
    optimizer: Any,
    precision: Precision,
    device: torch.device,
    ctx: WorkerContext,
    total: int,
    noise_gen: torch.Generator,
    micro_loss: Any,
    renderer: Any,
    gang: Gang | None = None,
) -> LoopResult:
    """The shared training loop over `model` (its trainable parameters are what checkpoints
    hold), with the noise generator checkpointed beside it and samples rendered as it goes.
    In a gang the loop averages the gradients over it (no DDP wrapper: the recipes call their
    modules directly) and checkpoints from rank 0."""
    gang = gang or Gang()
    loop = gang.loop(
        spec.training,
        ctx,
        average_grads=True,
        model=model,
        optimizer=optimizer,
        precision=precision,
        device=device,
        total=total,
        generators={"noise": noise_gen},
        fingerprint=gang.fingerprint(spec_fingerprint(spec, ctx.threads)),
    )
    return loop.run(micro_loss, on_step=renderer.on_step if renderer else None)
