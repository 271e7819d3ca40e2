"""The data and samples sections of a job spec (`data:` for image and text jobs, `samples:`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from lorajobs.jobspecs.base import Strict as _Strict
from lorajobs.jobspecs.base import check_location


class ImageData(_Strict):
    """How an image dataset is read, captioned and bucketed (`data:` on an image job)."""

    format: Literal["auto", "captions", "kohya", "imagefolder"] = Field(
        "auto",
        description=(
            "Dataset layout. captions: images with same-name .txt captions; kohya: folders named "
            "N_concept (N repeats, concept is the caption when a .txt is missing); imagefolder: "
            "Hugging Face metadata.jsonl with file_name + text/caption; auto: detect."
        ),
    )
    caption_column: str | None = Field(
        None,
        min_length=1,
        description="imagefolder: the metadata.jsonl caption field. Default: text, else caption.",
    )
    require_captions: bool = Field(
        False, description="Fail, naming the image, when an image has no caption (else: '')."
    )
    trigger_word: str | None = Field(
        None, min_length=1, description="Prepended to every caption as 'trigger, caption'."
    )
    caption_dropout: float = Field(
        0.0, ge=0.0, le=1.0, description="Chance of an empty caption per sample per epoch (seeded)."
    )
    shuffle_tags: bool = Field(
        False, description="Shuffle comma-separated caption tags per sample per epoch (seeded)."
    )
    keep_tokens: int = Field(
        0, ge=0, le=1000, description="With shuffle_tags: the first N tags keep their place."
    )
    bucketing: bool = Field(
        False,
        description="Aspect-ratio bucketing: each image goes to the bucket closest to its aspect; "
        "every batch comes from one bucket. Off: every image is a centre-cropped square.",
    )
    min_resolution: int | None = Field(
        None, ge=8, le=8192, description="Smallest bucket side, pixels. Default: resolution / 2."
    )
    max_resolution: int | None = Field(
        None, ge=8, le=8192, description="Largest bucket side, pixels. Default: resolution * 2."
    )
    bucket_step: int = Field(
        64, ge=8, le=1024, multiple_of=8, description="Bucket sides are multiples of this (pixels)."
    )
    flip_p: float = Field(
        0.0, ge=0.0, le=1.0, description="Probability of a horizontal flip, per sample per epoch."
    )
    crop: Literal["center", "random"] = Field(
        "center", description="Where the crop to the bucket falls: the centre, or random (seeded)."
    )


class Samples(_Strict):
    """Validation images rendered during and after training (`samples:` on an image job)."""

    prompts: list[str] = Field(
        ..., min_length=1, max_length=16, description="One grid cell (image) per prompt."
    )
    every: int = Field(
        0,
        ge=0,
        le=10_000_000,
        description="Render every N optimizer steps as well as at the end (0: only at the end).",
    )
    negative_prompt: str | None = Field(None, description="Negative prompt for every sample.")
    num_inference_steps: int = Field(20, ge=1, le=200, description="Denoising steps per sample.")
    guidance_scale: float = Field(7.5, ge=0.0, le=50.0, description="Classifier-free guidance.")
    resolution: int | None = Field(
        None,
        ge=32,
        le=4096,
        multiple_of=8,
        description="Square sample size in pixels. Default: training.resolution.",
    )
    seed: int = Field(
        0,
        ge=0,
        le=2**32 - 1,
        description="Seed of the sample noise: the same for every render, so grids compare.",
    )


class TextData(_Strict):
    """How a text dataset is read, templated, masked and packed (`data:` on a text job)."""

    format: Literal["auto", "text", "completion", "alpaca", "chat"] = Field(
        "auto",
        description=(
            "Row format. text: {text}; completion: {prompt, completion}; alpaca: {instruction, "
            "input?, output}; chat: {messages: [{role, content}]}; auto: detect from the first row."
        ),
    )
    chat_template: str | None = Field(
        None,
        min_length=1,
        description="chat: a built-in template name (chatml) or a Jinja template. "
        "Default: the tokenizer's own.",
    )
    train_on_prompt: bool = Field(
        False,
        description="Also train on prompt / instruction / user / system tokens. Default: loss only "
        "on completion and assistant tokens.",
    )
    packing: bool = Field(
        False,
        description="Pack examples into max_seq_length blocks (no padding; attention and positions "
        "reset at each example boundary).",
    )
    validation_split: float = Field(
        0.0, ge=0.0, lt=1.0, description="Fraction of examples held out for eval loss (seeded)."
    )
    validation: str | None = Field(
        None,
        min_length=1,
        description="A validation JSONL file/folder (path or URI); excludes validation_split.",
    )

    _location = field_validator("validation")(check_location)

    @model_validator(mode="after")
    def _one_validation_source(self) -> TextData:
        if self.validation is not None and self.validation_split > 0:
            raise ValueError("set validation or validation_split, not both")
        return self
