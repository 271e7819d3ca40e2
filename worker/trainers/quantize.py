"""Quantized frozen bases (QLoRA) and the 8-bit optimizer: what may run here, and how a base
is quantized. Shared by the text trainer and the Flux loader.

- `refuse_here(training, device)`: one line (`NeedsCuda`) when the spec's `quantize_base` or
  `optimizer: adamw8bit` cannot run on this machine: no CUDA device, or no bitsandbytes (the
  line names the extra, `pip install 'lorajobs[quant]'`).
- `text_load_kwargs(mode)`: `from_pretrained` arguments of a quantized causal LM —
  bitsandbytes' usual QLoRA settings for nf4 (4-bit NormalFloat, double quantization, bf16
  compute) and int8 (LLM.int8); fp8 loads bf16 and is quantized after (`quantize_linears`).
- `quantize_flux_transformer(model, mode)`: a loaded (and merged) Flux transformer's linear
  layers quantized in place, before its LoRA is added; its embedders, final projection and
  norms stay in bf16 (small, and numerically the sensitive ones).
- (`jobspecs.cuda.base_quantization(mode)`: what the sidecar and model card record.)

The adapter itself is never quantized: LoRA weights and optimizer state stay fp32 and the
saved adapter loads on the unquantized base.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lorajobs.jobspecs.cuda import QUANT_EXTRA, cuda_settings
from lorajobs.jobspecs.failures import NeedsCuda

#: Flux transformer layers kept unquantized: embedders, the final norm and projection.
FLUX_KEEP = re.compile(r"^(x_embedder|context_embedder|time_text_embed|norm_out|proj_out)(\.|$)")


def problem(training: Any, *, has_cuda: bool, has_bnb: bool) -> str | None:
    """Why `training`'s CUDA-only settings cannot run on a machine like this (None: they can)."""
    needs = cuda_settings(training)
    if not needs:
        return None
    bnb_needed = training.optimizer == "adamw8bit" or training.quantize_base in ("nf4", "int8")
    missing = f"pip install '{QUANT_EXTRA}' for bitsandbytes"
    if not has_cuda:
        also = (
            f" (and bitsandbytes is not installed: {missing})" if bnb_needed and not has_bnb else ""
        )
        return f"{needs[0]} needs a CUDA GPU and this machine has none{also}"
    if bnb_needed and not has_bnb:
        what = needs[0] if training.quantize_base != "fp8" else "training.optimizer adamw8bit"
        return f"{what} needs bitsandbytes, which is not installed here: {missing}"
    return None


def refuse_here(training: Any, device: torch.device | None = None) -> None:
    """Raise `NeedsCuda` when `training` asks for what this machine cannot run."""
    has_cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    line = problem(training, has_cuda=has_cuda, has_bnb=has_bnb)
    if line:
        raise NeedsCuda(line)


def text_load_kwargs(mode: str, device: torch.device) -> dict[str, Any]:
    """`from_pretrained` arguments for a causal LM quantized by bitsandbytes on `device`."""
    from transformers import BitsAndBytesConfig

    if mode == "nf4":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    elif mode == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        raise ValueError(f"{mode} is not a bitsandbytes mode")
    if device.type == "cuda":
        place: int | str = device.index if device.index is not None else torch.cuda.current_device()
    else:
        place = device.type
    return {"quantization_config": config, "device_map": {"": place}, "dtype": torch.bfloat16}


class Fp8Linear(nn.Linear):
    """A frozen linear layer stored in float8 (e4m3) with one scale per output row, computed
    in the input's dtype: half the memory of bf16 weights, on any GPU (weight-only, so no fp8
    matmul kernels are needed). An `nn.Linear`, so PEFT puts LoRA on it as on any other."""

    weight_scale: torch.Tensor

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> Fp8Linear:
        w = layer.weight.detach()
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.in_features, out.out_features = layer.in_features, layer.out_features
        amax = w.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
        scale = amax / torch.finfo(torch.float8_e4m3fn).max
        q = (w.float() / scale).to(torch.float8_e4m3fn)
        out.weight = nn.Parameter(q, requires_grad=False)
        out.register_buffer("weight_scale", scale)
        out.bias = layer.bias
        if out.bias is not None:
            out.bias.requires_grad_(False)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_scale.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, w, bias)


def _quantized(layer: nn.Linear, mode: str, device: torch.device) -> nn.Module:
    """`layer` quantized on `device`. bitsandbytes quantizes a weight as it moves to the GPU:
    its layer is made on the meta device and given that weight (as transformers' own
    bitsandbytes loader does), so no full-precision copy is allocated on the way."""
    if mode == "fp8":
        return Fp8Linear.from_linear(layer.to(device))
    import bitsandbytes as bnb

    w, has_bias = layer.weight.detach().to("cpu"), layer.bias is not None
    q: nn.Module
    if mode == "nf4":
        q = bnb.nn.Linear4bit(
            layer.in_features,
            layer.out_features,
            bias=has_bias,
            compute_dtype=torch.bfloat16,
            compress_statistics=True,  # double quantization
            quant_type="nf4",
            device="meta",
        )
        q.weight = bnb.nn.Params4bit(
            w, requires_grad=False, compress_statistics=True, quant_type="nf4"
        ).to(device)
    else:
        q = bnb.nn.Linear8bitLt(
            layer.in_features,
            layer.out_features,
            bias=has_bias,
            has_fp16_weights=False,
            threshold=6.0,
            device="meta",
        )
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False).to(device)
    if has_bias:
        bias = layer.bias.detach().to(device, torch.bfloat16)
        q.bias = nn.Parameter(bias, requires_grad=False)
    return q


def quantize_linears(
    model: nn.Module, mode: str, device: torch.device, keep: Callable[[str], bool]
) -> int:
    """Replace every `nn.Linear` of `model` whose name `keep` does not keep with its `mode`
    form on `device`, layer by layer (host memory never holds two copies of the model).
    Returns how many were quantized. Call it before LoRA is added, and never cast the model's
    dtype afterwards (that would undo fp8)."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and not keep(n)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _quantized(getattr(parent, child), mode, device))
    return len(names)


def quantize_flux_transformer(
    model: nn.Module, mode: str, device: torch.device | None = None
) -> nn.Module:
    """A Flux transformer (diffusers' `FluxTransformer2DModel`, loaded and merged) with its
    linear layers quantized to `mode` (nf4 | int8 | fp8) on `device` (default: the current
    CUDA device), in place; then add its LoRA (PEFT wraps bitsandbytes' and fp8 layers alike).
    The embedders, final norm and projection stay unquantized (`FLUX_KEEP`)."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device())
    model.requires_grad_(False)
    quantize_linears(model, mode, device, keep=lambda n: bool(FLUX_KEEP.search(n)))
    return model.to(device)


def lora_to_fp32(model: nn.Module) -> None:
    """LoRA weights in fp32 whatever the base's storage dtype: PEFT gives a new adapter its
    base layer's floating dtype, which for an fp8 base would be fp8."""
    for name, p in model.named_parameters():
        if "lora_" in name and p.dtype != torch.float32:
            p.data = p.data.float()
