"""Validation sample grids for image jobs: the spec's `samples:` prompts, rendered with the LoRA
being trained every `every` steps and at the end.

The renderer shares the training modules (the UNet with its PEFT adapter, and any text encoder
that carries LoRA) with a diffusers pipeline that it loads once, on first use, from the base
model folder: the VAE, tokenizers and untrained text encoders come from there. Sampling uses
DPM-Solver++ (good images in 20 steps whatever scheduler the folder names for training), and
the VAE decodes outside autocast, in fp32 when the base runs fp16 (SD VAEs overflow in fp16).

Rendering leaves training exactly as it was: the noise comes from a CPU generator seeded with
`samples.seed` for every image of every render (so grids compare across steps), modules go to
eval mode under no_grad and back to their own modes after, and the global RNGs (python, numpy,
torch, CUDA) are kept around loading and rendering. Files, in the adapter folder:
`samples/step-NNNNNN.png` at every `every`-th step (the final step included when it is one; the
same bytes as `samples.png` then, rendered once) and `samples.png` at the end of training. A
resumed attempt does not re-render the steps before its checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lorajobs.jobspecs.failures import UserDataError
from lorajobs.jobspecs.models import ImageJobSpec, Samples
from lorajobs.worker.board import Board
from lorajobs.worker.plots import draw_image_grid, save_png
from lorajobs.worker.trainers.loop import Precision

SAMPLES_DIR = "samples"
FINAL_NAME = "samples.png"


def step_name(step: int) -> str:
    """The grid file of `step`, relative to the adapter folder."""
    return f"{SAMPLES_DIR}/step-{step:06d}.png"


class SampleRenderer:
    """Renders the spec's prompts with the training modules into grid PNGs under `out_dir`."""

    # DDPM bases sample with DPM-Solver++; flow-matching ones keep their own scheduler.
    swap_scheduler = True
    # Pipeline components left out (None), e.g. text encoders whose outputs are precomputed.
    absent: tuple[str, ...] = ()

    def __init__(
        self,
        samples: Samples,
        *,
        model_dir: Path,
        out_dir: Path,
        unet: torch.nn.Module,
        precision: Precision,
        device: torch.device,
        resolution: int,
        title: str,
        text_encoders: Mapping[str, torch.nn.Module] | None = None,
        board: Board | None = None,
    ) -> None:
        """`text_encoders`: pipeline component name (`text_encoder`, `text_encoder_2`) → a
        trained text encoder; pass only those that carry LoRA (the others load from the folder,
        so the trainer can free its own). `board`: where each grid also goes, as an image."""
        # Checked now, before any training, rather than at the first render.
        index_path = model_dir / "model_index.json"
        try:
            self._index: dict[str, Any] = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserDataError(
                f"samples: the base model {model_dir} is not a diffusers pipeline folder "
                f"(model_index.json: {err}); remove samples: or use a full pipeline folder"
            ) from None
        self.samples = samples
        self.model_dir, self.out_dir = model_dir, out_dir
        self.precision, self.device = precision, device
        self.resolution, self.title = resolution, title
        self.shared: dict[str, torch.nn.Module] = {"unet": unet, **(text_encoders or {})}
        self.board = board
        self.files: list[str] = []  # written so far, relative to out_dir
        self.rendered = 0
        self.seconds = 0.0
        self._pipe: Any = None
        self._last: tuple[int, Image.Image] | None = None  # the latest step grid

    @classmethod
    def for_spec(
        cls,
        spec: ImageJobSpec,
        model_dir: Path,
        out_dir: Path,
        *,
        unet: torch.nn.Module,
        precision: Precision,
        device: torch.device,
        text_encoders: Mapping[str, torch.nn.Module] | None = None,
        board: Board | None = None,
    ) -> SampleRenderer | None:
        """The renderer of `spec.samples`; None when the spec asks for no samples."""
        if spec.samples is None:
            return None
        return cls(
            spec.samples,
            model_dir=model_dir,
            out_dir=out_dir,
            unet=unet,
            precision=precision,
            device=device,
            resolution=spec.samples.resolution or spec.training.resolution,
            title=spec.name,
            text_encoders=text_encoders,
            board=board,
        )

    def on_step(self, step: int) -> None:
        """`TrainLoop.run`'s hook: render after every `every`-th optimizer step."""
        every = self.samples.every
        if every and step % every == 0:
            grid = self.render(step)
            self._write(grid, step_name(step))
            self._last = (step, grid)

    def finish(self, step: int) -> tuple[list[str], dict[str, Any]]:
        """Write `samples.png` for the end of training (`step`: the last one; its step grid is
        reused when there is one), free the pipeline, and return (files, metrics)."""
        try:
            if self._last is not None and self._last[0] == step:
                grid = self._last[1]
            else:
                grid = self.render(step)
            self._write(grid, FINAL_NAME)
        finally:
            self.close()
        metrics = {"samples_rendered": self.rendered, "samples_seconds": round(self.seconds, 3)}
        return list(self.files), metrics

    def render(self, step: int) -> Image.Image:
        """One grid: every prompt rendered with the modules as they are now."""
        started = time.monotonic()
        prompts = self.samples.prompts
        with _global_rngs_kept(self.device), _eval_mode(self.shared.values()), torch.no_grad():
            pipe = self._pipeline()
            images = [self._image(pipe, prompt) for prompt in prompts]
        grid = draw_image_grid(images, prompts, title=f"{self.title} - step {step}")
        if self.board is not None:
            self.board.image("samples", grid, step)
        self.rendered += 1
        self.seconds += time.monotonic() - started
        return grid

    def close(self) -> None:
        """Drop the pipeline and the modules it loaded (the shared ones stay with training)."""
        self._pipe = None
        self._last = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- internals ----------------------------------------------------------------------------

    def _write(self, grid: Image.Image, rel: str) -> None:
        save_png(grid, self.out_dir / rel)
        self.files.append(rel)

    def _image(self, pipe: Any, prompt: str) -> Image.Image:
        """One prompt, denoised under the training precision, decoded by the VAE outside it."""
        s = self.samples
        # A fresh generator per image: the same starting noise in every cell of every render.
        generator = torch.Generator("cpu").manual_seed(s.seed)
        with self.precision.context(self.device):
            latents = pipe(
                prompt=prompt,
                negative_prompt=s.negative_prompt,
                height=self.resolution,
                width=self.resolution,
                num_inference_steps=s.num_inference_steps,
                guidance_scale=s.guidance_scale,
                generator=generator,
                output_type="latent",
            ).images
        return _decode(pipe, latents)

    def _pipeline(self) -> Any:
        """The pipeline, loaded on first use: the folder's pipeline class and components, with
        the training modules in place of the folder's."""
        if self._pipe is not None:
            return self._pipe
        from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

        base = self.precision.base_dtype
        kwargs: dict[str, Any] = dict(self.shared)
        kwargs.update(dict.fromkeys(self.absent))  # components not loaded at all
        if "safety_checker" in self._index:  # SD 1.x/2.x folders: no NSFW filter on samples
            kwargs.update(
                safety_checker=None, feature_extractor=None, requires_safety_checker=False
            )
        try:
            pipe = DiffusionPipeline.from_pretrained(
                self.model_dir,
                local_files_only=True,
                torch_dtype=base,
                **kwargs,
            )
        except (OSError, ValueError, TypeError) as err:
            raise UserDataError(
                f"samples: cannot load the base model {self.model_dir} as a pipeline ({err})"
            ) from None
        shared = {id(m) for m in self.shared.values()}
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module) and id(component) not in shared:
                component.requires_grad_(False)
                component.to(self.device)
                component.eval()
        if base == torch.float16:
            pipe.vae.to(dtype=torch.float32)  # SD VAEs overflow in fp16
        if self.swap_scheduler:
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self._pipe = pipe
        return pipe


def _decode(pipe: Any, latents: torch.Tensor) -> Image.Image:
    """Latents (as the UNet sees them) to an image, undoing the VAE's scaling as the SD / SDXL
    pipelines do (`latents_mean` / `latents_std` where the VAE has them, else `shift_factor`)."""
    vae = pipe.vae
    cfg = vae.config
    z = latents.to(vae.device, vae.dtype)
    mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
    if mean is not None and std is not None:
        mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(z)
        std_t = torch.tensor(std).view(1, -1, 1, 1).to(z)
        z = z * std_t / cfg.scaling_factor + mean_t
    else:
        z = z / cfg.scaling_factor + (cfg.get("shift_factor") or 0.0)
    pixels = vae.decode(z).sample
    images: list[Image.Image] = pipe.image_processor.postprocess(pixels.float(), output_type="pil")
    return images[0]


@contextlib.contextmanager
def _global_rngs_kept(device: torch.device) -> Iterator[None]:
    """Restore python's, numpy's, torch's and the device's global RNG states on exit: whatever
    a library draws while loading or rendering, training then draws what it would have."""
    py_state, np_state = random.getstate(), np.random.get_state()
    cuda: list[int] = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


@contextlib.contextmanager
def _eval_mode(modules: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Eval mode (no dropout) for `modules`; on exit every submodule gets back its own mode."""
    roots = list(modules)
    modes = [(m, m.training) for module in roots for m in module.modules()]
    for module in roots:
        module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
