"""What the tiny base models compute with LoRA adapters loaded the reference way (PEFT for text,
diffusers for image), on fixed inputs: the yardstick merged and exported adapters are held to.

Not a fixture plugin: plain helpers (torch, PEFT and diffusers are imported by the calls).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: Token ids fed to the tiny Llama (its vocabulary is larger than the largest).
TEXT_IDS = [[1, 5, 9, 17, 33, 2, 8, 40, 3]]


def _weights(adapters: Sequence[Path], weights: Sequence[float] | None) -> list[float]:
    return list(weights) if weights is not None else [1.0] * len(adapters)


def text_logits(
    model_dir: Path, adapters: Sequence[Path] = (), weights: Sequence[float] | None = None
) -> Any:
    """Logits of the transformers model at `model_dir` (a base, or a merged export) on
    `TEXT_IDS`, with `adapters` all active at once in PEFT, each up-matrix scaled by its weight."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    if adapters:
        names = [f"a{i}" for i in range(len(adapters))]
        model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
        for name, folder in zip(names[1:], adapters[1:]):
            model.load_adapter(folder, adapter_name=name)
        with torch.no_grad():
            for module in model.modules():
                for name, w in zip(names, _weights(adapters, weights)):
                    if hasattr(module, "lora_B") and name in module.lora_B:
                        module.lora_B[name].weight.mul_(w)
        model.base_model.set_adapter(names)
        model.eval()
    with torch.no_grad():
        return model(torch.tensor(TEXT_IDS)).logits


def _sd_pipeline(model_dir: Path, adapters: Sequence[Path], weights: Sequence[float] | None) -> Any:
    """The SD pipeline at `model_dir` with `adapters` loaded by diffusers at `weights`."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    names = [f"a{i}" for i in range(len(adapters))]
    for name, folder in zip(names, adapters):
        pipe.load_lora_weights(folder, adapter_name=name)
    if adapters:
        pipe.set_adapters(names, adapter_weights=_weights(adapters, weights))
    return pipe


def unet_output(
    model_dir: Path, adapters: Sequence[Path] = (), weights: Sequence[float] | None = None
) -> Any:
    """The UNet's prediction of the diffusers pipeline at `model_dir` on a fixed latent, text
    embedding and timestep, with `adapters` loaded by diffusers at `weights` (set_adapters)."""
    import torch

    pipe = _sd_pipeline(model_dir, adapters, weights)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn((1, 4, 32, 32), generator=gen)
    context = torch.randn((1, 77, 32), generator=gen)
    with torch.no_grad():
        return pipe.unet(sample, torch.tensor([400]), encoder_hidden_states=context).sample


def text_encoder_output(
    model_dir: Path, adapters: Sequence[Path] = (), weights: Sequence[float] | None = None
) -> Any:
    """The SD pipeline's text-encoder hidden states for a fixed prompt, with `adapters` loaded
    by diffusers at `weights` (their text-encoder LoRA, where they have one)."""
    import torch

    pipe = _sd_pipeline(model_dir, adapters, weights)
    ids = pipe.tokenizer(
        ["a photo of a red circle"],
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]
