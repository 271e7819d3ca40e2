"""Pydantic models of a job spec: the contract between the user, the queue and the worker.

One YAML file is one job. `kind` selects the model (`image` or `text`); every field carries a
description (it becomes the JSON Schema users' editors show) and unknown keys are errors.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, TypeVar

from pydantic import (
    Field,
    TypeAdapter,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from lorajobs.jobspecs.base import Strict as _Strict
from lorajobs.jobspecs.base import check_location
from lorajobs.jobspecs.cuda import quantization_problem
from lorajobs.jobspecs.sections import ImageData, Samples, TextData

# Names become object keys (`adapters/<name>/<job_id>/`): keep them to a safe alphabet so a name
# can never climb out of its prefix or need quoting.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# Per-kind LoRA targets used when the spec names none. Image: the UNet's attention projections
# (what diffusers' own LoRA scripts train). Text: attention projections, which exist under these
# names in Llama, Mistral, Qwen, Gemma and most causal LMs.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "image": ["to_k", "to_out.0", "to_q", "to_v"],
    "text": ["k_proj", "o_proj", "q_proj", "v_proj"],
}


class LoraSettings(_Strict):
    """The adapter's shape."""

    rank: int = Field(
        8, ge=1, le=1024, description="LoRA rank r: the width of the low-rank update."
    )
    alpha: float = Field(8.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch input.")
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description="Module names (suffixes) to adapt. Default: attention projections for the kind.",
    )
    use_dora: bool = Field(
        False,
        description="DoRA: learn a per-output magnitude on top of the LoRA direction (PEFT's "
        "use_dora). Costs ~2x a LoRA step; such adapters have no kohya export and cannot be merged.",
    )
    use_rslora: bool = Field(
        False,
        description="rsLoRA: scale the update by alpha / sqrt(rank) instead of alpha / rank, which "
        "keeps high ranks learning (PEFT's use_rslora).",
    )

    @field_validator("target_modules")
    @classmethod
    def _sorted_unique(cls, v: list[str] | None) -> list[str] | None:
        # Sorted so the saved adapter config is byte-for-byte the same for the same spec.
        return None if v is None else sorted(set(v))


class _Training(_Strict):
    steps: int | None = Field(
        None, ge=1, le=10_000_000, description="Optimizer steps to train (or give epochs)."
    )
    epochs: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Passes over the dataset (or give steps): steps = epochs x ceil(examples / "
        "(batch_size x gradient_accumulation_steps)).",
    )
    batch_size: int = Field(
        1, ge=1, le=4096, description="Examples per forward pass (micro-batch)."
    )
    gradient_accumulation_steps: int = Field(
        1,
        ge=1,
        le=4096,
        description="Micro-batches whose gradients add up to one optimizer step; the effective "
        "batch is batch_size x this.",
    )
    learning_rate: float = Field(1e-4, gt=0, le=1.0, description="Peak learning rate.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        "constant",
        description="Learning-rate shape after warmup: constant, linear decay to 0, or cosine "
        "decay to 0 (the transformers schedules of the same names).",
    )
    warmup_steps: int = Field(
        0, ge=0, le=10_000_000, description="Steps of linear warmup from 0 to learning_rate."
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay on LoRA weights.")
    max_grad_norm: float = Field(
        1.0, ge=0.0, description="Clip the gradient's global L2 norm to this; 0 turns clipping off."
    )
    optimizer: Literal["adamw", "adamw8bit"] = Field(
        "adamw",
        description="adamw (torch), or adamw8bit (bitsandbytes: needs a CUDA GPU and "
        "pip install 'lorajobs[quant]').",
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "bf16",
        description="On a GPU: the frozen base model's dtype and autocast (LoRA weights and the "
        "optimizer stay fp32; fp16 adds loss scaling). On the CPU jobs always run fp32, so one "
        "spec runs anywhere; the sidecar records what was used.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, ~30% slower."
    )
    quantize_base: Literal["nf4", "int8", "fp8"] | None = Field(
        None,
        description="Quantize the frozen base on a CUDA GPU (QLoRA): nf4 (bitsandbytes 4-bit, double "
        "quant, bf16 compute), int8 (bitsandbytes), fp8 (float8 weights, torch). Text and Flux bases; "
        "nf4 / int8 need pip install 'lorajobs[quant]'. The adapter is saved unquantized. Default: off.",
    )
    checkpoint_every: int = Field(
        500,
        ge=0,
        le=10_000_000,
        description="Save a resumable checkpoint to <bucket>/jobs/<job_id>/checkpoints/ every N "
        "steps (0: never). A retried or re-run job resumes from the latest one.",
    )
    keep_checkpoints: int = Field(
        2, ge=1, le=1000, description="How many of the latest checkpoints to keep in the bucket."
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed for weights, data order and noise.")

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> _Training:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of steps or epochs")
        return self


class ImageTraining(_Training):
    """Training settings for an image (diffusion UNet) LoRA."""

    resolution: int = Field(
        512, ge=32, le=4096, multiple_of=8, description="Square training resolution in pixels."
    )
    train_text_encoder: bool = Field(
        False,
        description="Also put LoRA on the text encoder(s) (attention projections q/k/v/out_proj; "
        "both encoders on SDXL). Caption embeddings are then computed every step, not cached.",
    )
    text_encoder_learning_rate: float | None = Field(
        None,
        gt=0,
        le=1.0,
        description="Peak learning rate of the text-encoder LoRA. Default: learning_rate.",
    )
    noise_offset: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Add this much per-channel constant noise (the 'offset noise' trick): lets "
        "the model learn very dark and very bright images. Typical: 0.05-0.1. 0: off.",
    )
    min_snr_gamma: float | None = Field(
        None,
        gt=0,
        le=100,
        description="Min-SNR loss weighting (Hang et al. 2023): weight each timestep's loss by "
        "min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v-prediction). Typical: 5. Default: off.",
    )

    # Flow-matching bases (Flux.1): how timesteps are drawn, and the guidance embedding.
    timestep_sampling: Literal["uniform", "logit_normal", "shift"] = Field(
        "shift",
        description="Flow-matching bases (Flux.1) only: how each step's noise level sigma in (0, 1) "
        "is drawn. uniform; logit_normal (sigmoid of a normal with logit_mean / logit_std, as SD3 "
        "and diffusers' scripts); shift: logit_normal, then shifted toward noise by the base "
        "scheduler's resolution-dependent shift (Flux's mu from the image's token count; a fixed "
        "shift where the scheduler has no dynamic shifting), as kohya's flux_shift.",
    )
    logit_mean: float = Field(
        0.0, ge=-5.0, le=5.0, description="Mean of the logit-normal draw (logit_normal, shift)."
    )
    logit_std: float = Field(
        1.0, gt=0.0, le=5.0, description="Std of the logit-normal draw (logit_normal, shift)."
    )
    guidance_scale: float | None = Field(
        None,
        ge=0.0,
        le=100.0,
        description="Guidance-distilled flow-matching bases (FLUX.1-dev: a transformer with "
        "guidance_embeds) only: the value fed to the guidance embedding while training. "
        "Default: 1.0, as kohya recommends for LoRAs (samples default to it as well).",
    )

    @model_validator(mode="after")
    def _te_lr_needs_te(self) -> ImageTraining:
        if self.text_encoder_learning_rate is not None and not self.train_text_encoder:
            raise ValueError("text_encoder_learning_rate needs train_text_encoder: true")
        return self


class TextTraining(_Training):
    """Training settings for a text (causal LM) LoRA."""

    max_seq_length: int = Field(
        512, ge=8, le=1_048_576, description="Token sequences are truncated to this length."
    )
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="How a gang (resources.gpus > 1) holds the model: ddp (every GPU holds the "
        "whole base) or fsdp (PyTorch FSDP2: the base, the LoRA and the optimizer state are "
        "sharded over the gang's GPUs, so a base larger than one GPU trains; needs a gang).",
    )


class Resources(_Strict):
    """What one attempt of the job needs from a node."""

    gpus: float = Field(
        1,
        ge=0,
        le=64,
        description="GPUs per job; fractions (0.25) pack small jobs on one GPU; 0 runs on CPU.",
    )
    gpu_type: str | None = Field(
        None,
        description="Ray accelerator type the node must have, e.g. A100-80G or H100. Default: any.",
    )
    cpus: int = Field(
        1, ge=1, le=512, description="CPU cores; also the torch thread count, which fixes results."
    )
    memory_gb: float | None = Field(
        None, gt=0, description="Host memory the job needs, in GiB. Default: no reservation."
    )
    pack: Literal["auto", "never"] | int = Field(
        "auto",
        description="Training this job in one worker with other queued jobs of the same kind, "
        "base model (by content) and settings, each keeping its own LoRA: 'auto' (when it "
        "starts a waiting job sooner, up to a memory estimate), 'never', or the most jobs a "
        "pack with this job may hold (2-64).",
    )

    @field_validator("pack")
    @classmethod
    def _pack_size(cls, v: str | int) -> str | int:
        if isinstance(v, int) and not 2 <= v <= 64:
            raise ValueError("a pack holds 2 to 64 jobs ('never' to train alone)")
        return v

    nodes: int = Field(
        1,
        ge=1,
        le=64,
        description="Nodes of a multi-node job (with gpus_per_node): its workers run as one gang "
        "on this many nodes, all at once or not at all.",
    )
    gpus_per_node: int | None = Field(
        None,
        ge=1,
        le=64,
        description="GPUs on each of `nodes` nodes; `gpus` is then nodes x gpus_per_node. "
        "One worker per GPU (Ray Train, DDP). Default: `gpus` on one node.",
    )

    @field_validator("gpus")
    @classmethod
    def _whole_or_fraction(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError("more than one GPU must be a whole number")
        return v

    @model_validator(mode="before")
    @classmethod
    def _gang(cls, data: object) -> object:
        # Fills in `gpus` (the job's total, which limits and cost count) from a multi-node shape.
        if not isinstance(data, dict):
            return data
        nodes, per_node = data.get("nodes", 1), data.get("gpus_per_node")
        if per_node is None:
            if isinstance(nodes, int) and nodes > 1:
                raise ValueError("nodes > 1 needs gpus_per_node (the GPUs on each node)")
            return data
        if not isinstance(nodes, int) or not isinstance(per_node, int):
            return data  # the field validators name the bad one
        total = nodes * per_node
        if data.get("gpus") is not None and data["gpus"] != total:
            raise ValueError(
                f"gpus {data['gpus']:g} is not nodes x gpus_per_node ({total}): give one or "
                "the other"
            )
        return {**data, "gpus": total}

    @property
    def workers(self) -> int:
        """Training processes of the job: one per GPU when it has more than one, else one."""
        return int(self.gpus) if self.gpus > 1 else 1

    @property
    def gang(self) -> bool:
        """Whether the job runs as a gang of workers (Ray Train) rather than one task."""
        return self.workers > 1


_DURATION_RE = re.compile(
    r"^(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?"
    r"(?:(\d+(?:\.\d+)?)s)?$"
)


def parse_duration(text: str) -> float:
    """Seconds in a duration such as '45s', '90m', '2h', '1h30m', '1d' or a bare number."""
    t = text.strip().lower().replace(" ", "")
    try:
        return float(t)
    except ValueError:
        pass
    m = _DURATION_RE.match(t)
    if not t or m is None or not any(m.groups()):
        raise ValueError("must be seconds or a duration such as '90m', '2h', '1h30m'")
    d, h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return d * 86400 + h * 3600 + mi * 60 + s


# Stored as seconds; written by users as seconds or a duration string.
MaxRuntime = Annotated[
    float | None,
    Field(gt=0),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "exclusiveMinimum": 0},
                {"type": "string", "pattern": r"^\s*(\d+(\.\d+)?[dhms]\s*)+$"},
                {"type": "null"},
            ]
        }
    ),
]


class _JobSpec(_Strict):
    name: str = Field(
        ...,
        description="Adapter name: letters, digits, '.', '_' and '-', at most 64 characters.",
    )
    owner: str = Field("default", min_length=1, max_length=64, description="Who the job is for.")
    priority: int = Field(0, ge=-100, le=100, description="Higher runs first; FIFO within one.")
    base_model: str = Field(
        ...,
        min_length=1,
        description="Base model: a local folder, an s3:// or file:// folder, or a hub id.",
    )
    dataset: str = Field(
        ...,
        min_length=1,
        description="Training data: a local folder/file, or an s3:// / file:// URI.",
    )
    output: str | None = Field(
        None, description="Bucket URI for outputs. Default: the configured LORAJOBS_BUCKET."
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="Adapter shape.")
    resources: Resources = Field(default_factory=Resources, description="What a node must offer.")
    max_runtime: MaxRuntime = Field(
        None,
        description="Longest one attempt may run, from dispatch: seconds or a duration such as "
        "'90m', '2h', '1h30m'. The job fails (user error, no retry) when it is exceeded. "
        "Default: no limit.",
    )

    @field_validator("max_runtime", mode="before")
    @classmethod
    def _duration(cls, v: object) -> object:
        return parse_duration(v) if isinstance(v, str) else v

    _locations = field_validator("base_model", "dataset", "output")(check_location)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(
                "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return v

    @model_validator(mode="after")
    def _quantized_base_settings(self) -> _JobSpec:
        problem = quantization_problem(self.training, self.lora, self.resources.gpus)  # type: ignore[attr-defined]
        if problem:
            raise ValueError(problem)
        return self

    def target_modules(self) -> list[str]:
        """The LoRA targets this job trains: the spec's, or the kind's default."""
        return list(self.lora.target_modules or DEFAULT_TARGETS[self.kind])  # type: ignore[attr-defined]


class ImageJobSpec(_JobSpec):
    """A LoRA on a diffusion model's UNet, trained on images with same-name .txt captions."""

    kind: Literal["image"] = Field(description="Job kind: an image (diffusion) LoRA.")
    training: ImageTraining = Field(..., description="Training settings.")
    data: ImageData = Field(
        default_factory=ImageData, description="Dataset layout, captions, buckets, augmentation."
    )
    samples: Samples | None = Field(
        None,
        description="Validation prompts rendered every N steps and at the end into grid PNGs "
        "(samples/step-N.png, samples.png) uploaded with the adapter. Default: none.",
    )

    @model_validator(mode="after")
    def _batch_splits_across_workers(self) -> ImageJobSpec:
        return _splits_across_workers(self)


class TextJobSpec(_JobSpec):
    """A LoRA on a causal language model, trained on JSONL rows with a `text` field."""

    kind: Literal["text"] = Field(description="Job kind: a text (causal LM) LoRA.")
    training: TextTraining = Field(..., description="Training settings.")
    data: TextData = Field(
        default_factory=TextData, description="Row format, chat template, loss mask, packing, eval."
    )

    @model_validator(mode="after")
    def _batch_splits_across_workers(self) -> TextJobSpec:
        _splits_across_workers(self)
        if self.training.distributed == "fsdp":
            if not self.resources.gang:
                raise ValueError(
                    "training.distributed fsdp shards the base over a gang's GPUs: it needs "
                    "resources.gpus > 1 (or nodes x gpus_per_node)"
                )
            if self.training.quantize_base:
                raise ValueError(
                    "training.distributed fsdp cannot shard a quantized base: drop "
                    "training.quantize_base, or use ddp"
                )
        return self


_SpecT = TypeVar("_SpecT", "ImageJobSpec", "TextJobSpec")


def _splits_across_workers(spec: _SpecT) -> _SpecT:
    # batch_size is the global batch: each of the gang's workers takes an equal share.
    workers = spec.resources.workers
    if spec.training.batch_size % workers:
        raise ValueError(
            f"training.batch_size {spec.training.batch_size} must be a multiple of the "
            f"job's {workers} workers (one per GPU): it is split evenly between them"
        )
    return spec


JobSpec = Annotated[ImageJobSpec | TextJobSpec, Field(discriminator="kind")]
JOB_SPEC_ADAPTER: TypeAdapter[ImageJobSpec | TextJobSpec] = TypeAdapter(JobSpec)
AnyJobSpec = ImageJobSpec | TextJobSpec
