"""Quantized bases and 8-bit AdamW: the spec check, the worker's refusal lines (pure logic:
which line for which machine), the sidecar's record, the submit rule for "no node could run
it", and the fp8 base layer on a real tiny Llama (fp8 storage works on the CPU too)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lorajobs.jobspecs import SpecError, parse_spec
from lorajobs.jobspecs.cuda import base_quantization
from lorajobs.orchestrator import capability
from lorajobs.worker.trainers.quantize import (
    Fp8Linear,
    lora_to_fp32,
    problem,
    quantize_linears,
)


def _spec(gpus: float = 1, kind: str = "text", **training: object) -> dict:
    return {
        "kind": kind,
        "name": "q",
        "base_model": "m",
        "dataset": "d",
        "training": {"steps": 1, **training},
        "resources": {"gpus": gpus},
    }


@pytest.mark.parametrize("kind", ["text", "image"])
@pytest.mark.parametrize("mode", ["nf4", "int8", "fp8"])
def test_every_mode_is_a_spec_field_of_both_kinds(kind: str, mode: str) -> None:
    assert parse_spec(_spec(kind=kind, quantize_base=mode)).training.quantize_base == mode


@pytest.mark.parametrize(
    "training,field",
    [
        ({"quantize_base": "nf4"}, "training.quantize_base nf4"),
        ({"optimizer": "adamw8bit"}, "training.optimizer adamw8bit"),
    ],
)
def test_a_cpu_job_cannot_ask_for_cuda_only_settings(training: dict, field: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(_spec(gpus=0, **training))
    assert err.value.problems == [
        f"{field} needs a CUDA GPU: set resources.gpus to 1 (or a fraction), or drop it"
    ]
    assert parse_spec(_spec(gpus=0.25, **training))  # a shared GPU is a GPU


def test_dora_on_an_fp8_base_is_refused_by_the_spec() -> None:
    spec = {**_spec(quantize_base="fp8"), "lora": {"use_dora": True}}
    with pytest.raises(SpecError) as err:
        parse_spec(spec)
    assert err.value.problems == [
        "lora.use_dora cannot train on an fp8 base (training.quantize_base fp8): use nf4 or int8"
    ]
    assert parse_spec({**spec, "training": {"steps": 1, "quantize_base": "nf4"}})  # QDoRA


def test_an_unknown_mode_names_the_field() -> None:
    with pytest.raises(
        SpecError, match="training.quantize_base: Input should be 'nf4', 'int8' or 'fp8'"
    ):
        parse_spec(_spec(quantize_base="int4"))


def _tr(quantize_base: str | None = None, optimizer: str = "adamw") -> SimpleNamespace:
    return SimpleNamespace(quantize_base=quantize_base, optimizer=optimizer)


def test_the_worker_refusal_says_what_is_missing() -> None:
    # Nothing asked: nothing to refuse, on any machine.
    assert problem(_tr(), has_cuda=False, has_bnb=False) is None
    # No GPU: said first, with the extra when bitsandbytes is missing too.
    line = problem(_tr("nf4"), has_cuda=False, has_bnb=False)
    assert line == (
        "training.quantize_base nf4 needs a CUDA GPU and this machine has none (and "
        "bitsandbytes is not installed: pip install 'lorajobs[quant]' for bitsandbytes)"
    )
    assert problem(_tr("fp8"), has_cuda=False, has_bnb=False) == (
        "training.quantize_base fp8 needs a CUDA GPU and this machine has none"
    )
    # A GPU without bitsandbytes: the extra is named.
    assert problem(_tr("int8"), has_cuda=True, has_bnb=False) == (
        "training.quantize_base int8 needs bitsandbytes, which is not installed here: "
        "pip install 'lorajobs[quant]' for bitsandbytes"
    )
    assert "training.optimizer adamw8bit needs bitsandbytes" in str(
        problem(_tr("fp8", "adamw8bit"), has_cuda=True, has_bnb=False)
    )
    assert problem(_tr("fp8"), has_cuda=True, has_bnb=False) is None  # fp8 is torch's own
    assert problem(_tr("nf4", "adamw8bit"), has_cuda=True, has_bnb=True) is None


def test_the_sidecar_records_the_base_quantization() -> None:
    assert base_quantization(None) is None
    assert base_quantization("nf4") == {
        "mode": "nf4",
        "library": "bitsandbytes",
        "adapter_dtype": "float32",
        "quant_type": "nf4",
        "double_quant": True,
        "compute_dtype": "bfloat16",
    }
    assert base_quantization("fp8")["weight_dtype"] == "float8_e4m3fn"  # type: ignore[index]


@pytest.mark.parametrize(
    "visible,found,count", [(None, 2, 2), ("", 2, 0), ("-1", 2, 0), ("1", 2, 1), ("0,1,2", 2, 2)]
)
def test_local_gpus_follow_cuda_visible_devices(
    visible: str | None, found: int, count: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real_listdir = capability.os.listdir
    monkeypatch.setattr(
        capability.os,
        "listdir",
        lambda p: [str(i) for i in range(found)] if "nvidia" in str(p) else real_listdir(p),
    )
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert capability.local_gpu_count() == count


def test_no_node_could_run_it_only_on_a_gpu_less_machine_without_a_cluster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    quantized = parse_spec(_spec(quantize_base="nf4"))
    plain = parse_spec(_spec())
    monkeypatch.setattr(capability, "local_gpu_count", lambda: 0)
    line = capability.unrunnable(quantized, None)
    assert line is not None and line.startswith("training.quantize_base nf4 needs a CUDA GPU")
    assert capability.unrunnable(plain, None) is None  # GPU jobs keep their old path
    assert capability.unrunnable(quantized, "ray://head:10001") is None  # a cluster may grow
    monkeypatch.setattr(capability, "local_gpu_count", lambda: 1)
    assert capability.unrunnable(quantized, None) is None


def test_fp8_base_layers_train_an_fp32_lora(tiny_text_model: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_text_model, local_files_only=True)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    model.requires_grad_(False)
    n = quantize_linears(model, "fp8", torch.device("cpu"), keep=lambda n: n.endswith("lm_head"))
    assert n > 0 and type(model.lm_head) is torch.nn.Linear
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, Fp8Linear) and layer.weight.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        q = model(input_ids=ids).logits
    assert (q - ref).norm() / ref.norm() < 0.15  # e4m3 keeps ~3 mantissa bits per weight
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    lora_to_fp32(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in trainable)
    assert layer.weight.grad is None  # the base stays frozen


def test_a_flux_transformer_keeps_its_embedders_and_final_layers() -> None:
    """fp8 runs on the CPU too, so the layer choice is checked on a real (tiny) Flux here."""
    from diffusers import FluxTransformer2DModel

    from lorajobs.worker.trainers.quantize import quantize_flux_transformer

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    quantize_flux_transformer(model, "fp8", torch.device("cpu"))
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    kept = sorted(n for n, k in kinds.items() if k is torch.nn.Linear)
    assert kept and all(
        n.split(".")[0]
        in {"x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out"}
        for n in kept
    ), kept
    assert kinds["single_transformer_blocks.0.proj_out"] is Fp8Linear  # a block's own: quantized
    assert kinds["transformer_blocks.0.attn.to_q"] is Fp8Linear
    assert not any(p.requires_grad for p in model.parameters())
