"""What the sections of `bench/gpu_check.py` share: the run's setup, the model sizes, timing
and peak memory, and lorajobs' trainers driven through their real `train()`. The sections
themselves: `gpu_image.py` (SD 1.5 UNet) and `gpu_models.py` (Llama, Flux)."""

from __future__ import annotations

import gc
import importlib.util
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

LR = 1e-4
RANK = 16
IMAGE_TARGETS = ["to_k", "to_out.0", "to_q", "to_v"]
TEXT_TARGETS = ["k_proj", "o_proj", "q_proj", "v_proj"]

# SD 1.5's UNet (runwayml/stable-diffusion-v1-5 unet/config.json), the parts that set its cost.
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
# A ~1B Llama (TinyLlama's widths without grouped KV).
LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
}
# FLUX.1's transformer widths with 2 of its 19 double and 4 of its 38 single blocks.
FLUX = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
FLUX_TINY = {
    **FLUX,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "axes_dims_rope": (4, 6, 6),
}


@dataclass
class Setup:
    """Sizes and the device of one run."""

    tiny: bool
    steps: int
    warmup: int
    work: Path
    device: torch.device
    dtype: torch.dtype  # the frozen bases' dtype: bf16 on a GPU, fp32 on the CPU
    bnb: bool  # bitsandbytes can run here (CUDA and the package)

    @classmethod
    def create(cls, tiny: bool, steps: int, warmup: int, work: Path) -> Setup:
        cuda = torch.cuda.is_available()
        work.mkdir(parents=True, exist_ok=True)
        return cls(
            tiny=tiny,
            steps=steps,
            warmup=warmup,
            work=Path(tempfile.mkdtemp(prefix="run-", dir=work)),
            device=torch.device("cuda" if cuda else "cpu"),
            dtype=torch.bfloat16 if cuda else torch.float32,
            bnb=cuda and importlib.util.find_spec("bitsandbytes") is not None,
        )

    def describe(self) -> dict[str, Any]:
        gpu = torch.cuda.get_device_name() if self.device.type == "cuda" else None
        return {
            "tiny": self.tiny,
            "device": gpu or "cpu",
            "dtype": str(self.dtype),
            "bitsandbytes": self.bnb,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        }

    def autocast(self) -> Any:
        if self.device.type != "cuda":
            return torch.autocast("cpu", enabled=False)
        return torch.autocast("cuda", dtype=torch.bfloat16)


# -- measuring ---------------------------------------------------------------------------------


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(s: Setup) -> None:
    if s.device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(s: Setup) -> None:
    free()
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(s: Setup) -> float:
    if s.device.type != "cuda":
        return 0.0
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def timed_loop(s: Setup, step: Callable[[], None], steps: int) -> dict[str, Any]:
    """`s.warmup` untimed steps, then `steps` timed ones, synchronised at both ends."""
    for _ in range(s.warmup):
        step()
    _sync(s)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(s)
    ms = (time.perf_counter() - t) / steps * 1e3
    return {"ms_per_step": round(ms, 2), "steps": steps, "peak_gib": _peak_gib(s)}


def run_ours(s: Setup, kind: str, spec: Any, model: Path, data: Path) -> dict[str, Any]:
    """Our trainer's real `train()`; ms/step from its own progress reports (taken after it
    has read the losses, i.e. after the GPU finished those steps): from the first report to
    the last, so loading, the first (warm-up) steps and the export stay out."""
    from lorajobs.worker.context import WorkerContext
    from lorajobs.worker.trainers import get_trainer

    marks: list[tuple[int, float]] = []
    out_dir = Path(tempfile.mkdtemp(prefix=f"{kind}-out-", dir=s.work))
    ctx = WorkerContext(
        job_id="gpu-check",
        output_uri=out_dir.as_uri(),
        cache_dir=out_dir / "cache",
        threads=8,
        report=lambda p: marks.append((int(p["step"]), time.perf_counter())),
    )
    _reset_peak(s)
    out = get_trainer(kind)(spec, model, data, out_dir / "adapter", ctx)
    peak = _peak_gib(s)
    timed = [m for m in marks if m[0] >= s.warmup] or marks
    (s0, t0), (s1, t1) = timed[0], marks[-1]
    if s1 > s0:
        ms, steps = (t1 - t0) / (s1 - s0) * 1e3, s1 - s0
    else:  # one report only: the whole loop, warm-up included
        ms, steps = out.metrics["train_seconds"] / out.metrics["steps"] * 1e3, s1
    return {
        "ms_per_step": round(ms, 2),
        "steps": steps,
        "peak_gib": peak,
        "first_loss": round(out.metrics["first_loss"], 4),
        "final_loss": round(out.metrics["final_loss"], 4),
        "quantize_base": out.resolved.get("quantize_base"),
        "optimizer": out.resolved.get("optimizer"),
        "mixed_precision": out.resolved.get("mixed_precision"),
    }


def compare(ours: dict[str, Any] | None, bare: dict[str, Any] | None) -> dict[str, Any]:
    res: dict[str, Any] = {"lorajobs": ours, "bare": bare}
    if ours and bare and "ms_per_step" in ours and "ms_per_step" in bare:
        res["ratio"] = round(ours["ms_per_step"] / bare["ms_per_step"], 3)
        res["mem_ratio"] = round(ours["peak_gib"] / max(bare["peak_gib"], 1e-9), 3)
    return res


def third_party_modules() -> list[str]:
    """Top-level non-stdlib modules this process imported (what the device needs)."""
    names = {m.split(".")[0] for m in sys.modules}
    ours = {"lorajobs", "__main__", "_distutils_hack", "loops", "sd_proportions"}
    ours |= {"gpu_check", "gpu_sections", "gpu_image", "gpu_models"}
    return sorted(n for n in names if n not in sys.stdlib_module_names and n not in ours)
