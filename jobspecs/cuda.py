"""Spec settings that only a CUDA GPU can run: a quantized base (`training.quantize_base`) and
bitsandbytes' 8-bit AdamW (`training.optimizer: adamw8bit`).

One place says which they are and words the refusal, so the spec check (`resources.gpus: 0`),
the submit check (no node could run it) and the worker (no CUDA or no bitsandbytes here) say
the same thing.
"""

from __future__ import annotations

from typing import Any

#: The optional dependencies these settings need: `pip install 'lorajobs[quant]'`.
QUANT_EXTRA = "lorajobs[quant]"


def cuda_settings(training: Any) -> list[str]:
    """The settings of `training` that need CUDA, as `field value` phrases (empty: none)."""
    out = []
    mode = getattr(training, "quantize_base", None)
    if mode:
        out.append(f"training.quantize_base {mode}")
    if getattr(training, "optimizer", None) == "adamw8bit":
        out.append("training.optimizer adamw8bit")
    return out


def needs_cuda(training: Any) -> bool:
    """Whether the job can only run on a CUDA GPU."""
    return bool(cuda_settings(training))


def quantization_problem(training: Any, lora: Any, gpus: float) -> str | None:
    """The spec-time line for settings that cannot go together: a CUDA-only setting on a CPU
    job (`resources.gpus: 0`: no bitsandbytes kernels, and no point in a quantized base), or
    DoRA on an fp8 base (DoRA's magnitudes are computed from the base weight, which PEFT reads
    as raw float8 without its scale)."""
    needs = cuda_settings(training)
    if needs and gpus <= 0:
        return f"{needs[0]} needs a CUDA GPU: set resources.gpus to 1 (or a fraction), or drop it"
    if getattr(training, "quantize_base", None) == "fp8" and getattr(lora, "use_dora", False):
        return "lora.use_dora cannot train on an fp8 base (training.quantize_base fp8): use nf4 or int8"
    return None


#: The library each mode's kernels come from.
LIBRARY = {"nf4": "bitsandbytes", "int8": "bitsandbytes", "fp8": "torch"}


def base_quantization(mode: str | None) -> dict[str, Any] | None:
    """The base's quantization as the sidecar records it (None: the base ran unquantized)."""
    if not mode:
        return None
    out: dict[str, Any] = {"mode": mode, "library": LIBRARY[mode], "adapter_dtype": "float32"}
    if mode == "nf4":
        out.update(quant_type="nf4", double_quant=True, compute_dtype="bfloat16")
    elif mode == "int8":
        out.update(threshold=6.0)
    else:
        out.update(weight_dtype="float8_e4m3fn", scale="per output row", compute_dtype="bfloat16")
    return out
