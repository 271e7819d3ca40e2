"""Pydantic models of a job spec: the contract between the user, the queue and the worker.

One YAML file is one job. `kind` selects the model (`image` or `text`); every field carries a
description (it becomes the JSON Schema users' editors show) and unknown keys are errors.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSettings(_Strict):
    """The adapter's shape."""

    rank: int = Field(8, ge=1, le=1024, description="LoRA rank r: the width of the low-rank update.")
    alpha: float = Field(
        8.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch input.")
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description="Module names (suffixes) to adapt. Default: attention projections for the kind.",
    )

    @field_validator("target_modules")
    @classmethod
    def _sorted_unique(cls, v: list[str] | None) -> list[str] | None:
        # Sorted so the saved adapter config is byte-for-byte the same for the same spec.
        return None if v is None else sorted(set(v))


class _Training(_Strict):
    steps: int = Field(..., ge=1, le=10_000_000, description="Optimizer steps to train.")
    batch_size: int = Field(1, ge=1, le=4096, description="Examples per optimizer step.")
    learning_rate: float = Field(1e-4, gt=0, le=1.0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay on LoRA weights.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed for weights, data order and noise.")


class ImageTraining(_Training):
    """Training settings for an image (diffusion UNet) LoRA."""

    resolution: int = Field(
        512, ge=32, le=4096, multiple_of=8, description="Square training resolution in pixels."
    )


class TextTraining(_Training):
    """Training settings for a text (causal LM) LoRA."""

    max_seq_length: int = Field(
        512, ge=8, le=1_048_576, description="Token sequences are truncated to this length."
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

    @field_validator("gpus")
    @classmethod
    def _whole_or_fraction(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError("more than one GPU must be a whole number")
        return v


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
        ..., min_length=1, description="Training data: a local folder/file, or an s3:// / file:// URI."
    )
    output: str | None = Field(
        None, description="Bucket URI for outputs. Default: the configured LORAJOBS_BUCKET."
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="Adapter shape.")
    resources: Resources = Field(default_factory=Resources, description="What a node must offer.")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(
                "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return v

    def target_modules(self) -> list[str]:
        """The LoRA targets this job trains: the spec's, or the kind's default."""
        return list(self.lora.target_modules or DEFAULT_TARGETS[self.kind])  # type: ignore[attr-defined]


class ImageJobSpec(_JobSpec):
    """A LoRA on a diffusion model's UNet, trained on images with same-name .txt captions."""

    kind: Literal["image"] = Field(description="Job kind: an image (diffusion) LoRA.")
    training: ImageTraining = Field(..., description="Training settings.")


class TextJobSpec(_JobSpec):
    """A LoRA on a causal language model, trained on JSONL rows with a `text` field."""

    kind: Literal["text"] = Field(description="Job kind: a text (causal LM) LoRA.")
    training: TextTraining = Field(..., description="Training settings.")


JobSpec = Annotated[Union[ImageJobSpec, TextJobSpec], Field(discriminator="kind")]
JOB_SPEC_ADAPTER: TypeAdapter[ImageJobSpec | TextJobSpec] = TypeAdapter(JobSpec)
AnyJobSpec = Union[ImageJobSpec, TextJobSpec]
