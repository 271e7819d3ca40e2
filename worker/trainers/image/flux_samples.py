"""Validation grids of a Flux job, through `FluxPipeline` with the transformer being trained.

When the job caches its prompt embeddings (and so releases T5 and CLIP after caching), the
sample prompts are embedded once too, before the encoders go, and the pipeline is loaded
without text encoders: rendering never brings T5 back. Where the text encoders stay (captions
vary per step, or CLIP trains) the pipeline encodes the prompts itself, with CLIP's LoRA.
The pipeline keeps its own flow-matching scheduler; guidance is the spec's sample guidance
where given, else the training guidance. Flux has no negative prompt without true CFG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lorajobs.jobspecs.models import ImageJobSpec
from lorajobs.worker.context import WorkerContext
from lorajobs.worker.trainers.image.flux import FluxEncoders, t5_length
from lorajobs.worker.trainers.image.models import Conditioning
from lorajobs.worker.trainers.image.samples import SampleRenderer

_TEXT_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


class FluxSampleRenderer(SampleRenderer):
    """`SampleRenderer` for Flux.1 pipelines (see the module docstring)."""

    swap_scheduler = False
    guidance: float = 1.0
    t5_tokens: int = 512
    embeddings: dict[str, Conditioning] | None = None  # prompt → (T5 context, CLIP pooled)

    @classmethod
    def for_flux(
        cls,
        spec: ImageJobSpec,
        model_dir: Path,
        out_dir: Path,
        trained: dict[str, Any],
        precision: Any,
        device: torch.device,
        ctx: WorkerContext,
        guidance: float | None,
        encoders: FluxEncoders | None,
    ) -> FluxSampleRenderer | None:
        """The renderer of `spec.samples` (None without); `encoders`: given when the job will
        release its text encoders, to embed the prompts now."""
        if spec.samples is None:
            return None
        renderer = cls(
            spec.samples,
            model_dir=model_dir,
            out_dir=out_dir,
            unet=trained["transformer"],
            precision=precision,
            device=device,
            resolution=spec.samples.resolution or spec.training.resolution,
            title=spec.name,
            text_encoders={k: m for k, m in trained.items() if k != "transformer"},
            board=ctx.board,
        )
        renderer.shared = {"transformer": trained["transformer"], **renderer.shared}
        del renderer.shared["unet"]
        explicit = "guidance_scale" in spec.samples.model_fields_set
        renderer.guidance = spec.samples.guidance_scale if explicit else (guidance or 1.0)
        if encoders is not None and encoders.text_encoders is not None:
            renderer.t5_tokens = t5_length(encoders.tokenizers[1])
            prompts = list(dict.fromkeys(spec.samples.prompts))
            renderer.embeddings = {p: encoders.captions([p])[0] for p in prompts}
            renderer.absent = _TEXT_PARTS
        return renderer

    def _image(self, pipe: Any, prompt: str) -> Any:
        generator = torch.Generator("cpu").manual_seed(self.samples.seed)
        text: dict[str, Any] = {"prompt": prompt}
        if self.embeddings is not None:
            cond, dtype = self.embeddings[prompt], self.precision.base_dtype
            assert cond.pooled is not None
            text = {
                "prompt_embeds": cond.context[None].to(self.device, dtype),
                "pooled_prompt_embeds": cond.pooled[None].to(self.device, dtype),
            }
        else:
            self.t5_tokens = t5_length(pipe.tokenizer_2)
        with self.precision.context(self.device):
            return pipe(
                **text,
                height=self.resolution,
                width=self.resolution,
                num_inference_steps=self.samples.num_inference_steps,
                guidance_scale=self.guidance,
                max_sequence_length=self.t5_tokens,
                generator=generator,
            ).images[0]
