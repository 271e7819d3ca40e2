"""Tiny offline models and datasets, built once per test session (nothing comes from a hub)."""

from __future__ import annotations

from pathlib import Path

import pytest

# --- image: tiny Stable-Diffusion-1.x and SDXL pipelines and a learnable set of shapes ---


@pytest.fixture(scope="session")
def tiny_image_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD-1.x pipeline folder (64 px images, 32x32 latents), random weights, seed 0."""
    from lorajobs.worker.trainers.image.tiny import build_tiny_image_model

    return build_tiny_image_model(tmp_path_factory.mktemp("tiny-image-model"), seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL pipeline folder (two text encoders, text_time UNet), random weights, seed 0."""
    from lorajobs.worker.trainers.image.tiny import build_tiny_sdxl_model

    return build_tiny_sdxl_model(tmp_path_factory.mktemp("tiny-sdxl-model"), seed=0)


@pytest.fixture(scope="session")
def tiny_flux_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FLUX.1-dev-style pipeline (guidance embedding; 32 px → 16 channels), seed 0."""
    from lorajobs.worker.trainers.image.flux_tiny import build_tiny_flux_model

    return build_tiny_flux_model(tmp_path_factory.mktemp("tiny-flux-model"), seed=0)


@pytest.fixture(scope="session")
def tiny_flux_schnell_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FLUX.1-schnell-style pipeline (no guidance embedding, fixed shift), seed 0."""
    from lorajobs.worker.trainers.image.flux_tiny import build_tiny_flux_model

    out = tmp_path_factory.mktemp("tiny-flux-schnell-model")
    return build_tiny_flux_model(out, seed=0, guidance=False)


@pytest.fixture(scope="session")
def tiny_image_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight 64 px PNGs of coloured circles and squares with same-name .txt captions."""
    from lorajobs.worker.trainers.image.tiny import make_image_dataset

    return make_image_dataset(tmp_path_factory.mktemp("tiny-image-data"), n=8, size=64, seed=0)


# --- text: a tiny Llama causal LM and a learnable JSONL grammar ---


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LlamaForCausalLM folder (hidden 64, 2 layers) with its BPE tokenizer, seed 0."""
    from lorajobs.worker.trainers.text.tiny import build_tiny_text_model

    return build_tiny_text_model(tmp_path_factory.mktemp("tiny-text-model"), seed=0)


@pytest.fixture(scope="session")
def tiny_text_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 JSONL rows `{"text": ...}` of a small, learnable grammar."""
    from lorajobs.worker.trainers.text.tiny import make_text_dataset

    out = tmp_path_factory.mktemp("tiny-text-data") / "train.jsonl"
    return make_text_dataset(out, n=64, seed=0)
