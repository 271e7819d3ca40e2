"""A Flux.1 job walks the main path through the CLI as a subprocess, on real parts: submit ->
SQL queue (embedded SQLite) -> controller -> local Ray task -> the worker recognises Flux from
the base's transformer config and trains -> fetch; the fetched adapter loads in `FluxPipeline`
and changes what it renders, and its kohya file, read by diffusers' converter, plays like it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.e2e.cli import CLI, write_spec

pytestmark = pytest.mark.slow


def _render(model: Path, lora: Path | None = None) -> Any:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora.parent, weight_name=lora.name)
    return pipe(
        "a red circle",
        height=32,
        width=32,
        num_inference_steps=2,
        max_sequence_length=pipe.tokenizer_2.model_max_length,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]


def test_a_flux_job_through_the_queue(
    tmp_path: Path, tiny_flux_model: Path, tiny_image_dataset: Path
) -> None:
    cli = CLI(home=tmp_path / "home")
    spec = write_spec(
        tmp_path / "flux.yaml",
        "image",
        "e2e-flux",
        str(tiny_flux_model),
        str(tiny_image_dataset),
        training={"steps": 8, "learning_rate": 1e-2, "resolution": 32, "guidance_scale": 1.0},
        samples={"prompts": ["a red circle"], "num_inference_steps": 2},
    )
    r = cli("submit", str(spec), "--wait", "--json")
    assert r.code == 0, r.err[-3000:]
    (job,) = r.json()
    assert job["state"] == "succeeded", r.err[-3000:]

    r = cli("fetch", job["id"], "-o", str(tmp_path / "fetched"))
    assert r.code == 0, r.err
    dest = Path(r.out.strip())
    sidecar = json.loads((dest / "lorajobs.json").read_text())
    for rel, meta in sidecar["files"].items():
        assert hashlib.sha256((dest / rel).read_bytes()).hexdigest() == meta["sha256"]
    assert {"pytorch_lora_weights.safetensors", "e2e-flux.safetensors", "samples.png"} <= set(
        sidecar["files"]
    )
    resolved = sidecar["resolved"]
    assert resolved["model_family"] == "flux-dev" and resolved["objective"] == "flow_matching"

    base = _render(tiny_flux_model)
    tuned = _render(tiny_flux_model, dest / "pytorch_lora_weights.safetensors")
    assert np.abs(tuned - base).max() > 1e-3, "the Flux LoRA should change the render"

    # The kohya file through diffusers' converter, against the diffusers file: both without
    # the single block's fused linear1 (the converter assumes FLUX.1's real widths for it).
    with safe_open(dest / "pytorch_lora_weights.safetensors", "pt") as f:
        meta = f.metadata()
    skip = ("single_transformer_blocks.0.attn.to_", ".proj_mlp.")
    d = load_file(dest / "pytorch_lora_weights.safetensors")
    save_file(
        {k: v for k, v in d.items() if not any(s in k for s in skip)},
        tmp_path / "d.safetensors",
        meta,
    )
    k = load_file(dest / "e2e-flux.safetensors")
    save_file({n: v for n, v in k.items() if "_linear1." not in n}, tmp_path / "k.safetensors")
    np.testing.assert_allclose(
        _render(tiny_flux_model, tmp_path / "k.safetensors"),
        _render(tiny_flux_model, tmp_path / "d.safetensors"),
        atol=1e-5,
        rtol=0,
    )
