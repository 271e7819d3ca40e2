"""SDXL end to end on a tiny SDXL pipeline: two text encoders, pooled embeds and size/crop
conditioning; the adapter (UNet, and text encoders) loads in `StableDiffusionXLPipeline` and
changes what it renders; the kohya file plays exactly like the diffusers file; same spec, same
bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from lorajobs.jobspecs import parse_spec
from lorajobs.jobspecs.failures import UserDataError
from lorajobs.jobspecs.models import ImageJobSpec
from lorajobs.worker.context import TrainOutput, WorkerContext
from lorajobs.worker.trainers.image.recipe import train
from tests.plugins.pipelines import pipeline, render, text_states
from tests.plugins.specs import WEIGHTS, sha256, spec_dict

pytestmark = pytest.mark.slow

DIFFUSERS = WEIGHTS["image"]
KOHYA = "xl.safetensors"


def _spec(
    lora: dict[str, Any] | None = None, data: dict[str, Any] | None = None, **training: Any
) -> ImageJobSpec:
    spec = parse_spec(
        spec_dict(
            "image",
            "xl",
            "tiny-sdxl",
            "shapes",
            lora={"rank": 4, "alpha": 8.0, **(lora or {})},
            data=data or {},
            training={"steps": 8, "learning_rate": 1e-2, **training},
        )
    )
    assert isinstance(spec, ImageJobSpec)
    return spec


def _train(spec: ImageJobSpec, model: Path, data: Path, out: Path) -> TrainOutput:
    ctx = WorkerContext(job_id="j", output_uri=out.as_uri(), cache_dir=out / "cache", threads=1)
    return train(spec, model, data, out, ctx)


@pytest.fixture(scope="module")
def trained(
    tiny_sdxl_model: Path, tiny_image_dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[bool, tuple[Path, TrainOutput]]:
    """train_text_encoder → (adapter folder, result), 8 steps at lr 1e-2."""
    out = {}
    for te in (False, True):
        folder = tmp_path_factory.mktemp(f"sdxl-te-{te}")
        out[te] = (
            folder,
            _train(_spec(train_text_encoder=te), tiny_sdxl_model, tiny_image_dataset, folder),
        )
    return out


@pytest.fixture(scope="module")
def base_render(tiny_sdxl_model: Path) -> np.ndarray:
    return render(pipeline(tiny_sdxl_model))


@pytest.mark.parametrize("te", [False, True], ids=["unet", "unet+text-encoders"])
def test_sdxl_adapter_loads_in_the_sdxl_pipeline_and_kohya_plays_the_same(
    te: bool,
    trained: dict[bool, tuple[Path, TrainOutput]],
    tiny_sdxl_model: Path,
    base_render: np.ndarray,
) -> None:
    folder, result = trained[te]
    assert result.files == [DIFFUSERS, KOHYA, "loss.png"]
    assert result.resolved["model_family"] == "sdxl"
    assert result.resolved["base_model_version"] == "sdxl_base_v1-0"
    assert result.resolved["train_text_encoder"] is te
    assert result.metrics["text_cached"] is not te  # a training text encoder runs every step

    components = ["text_encoder", "text_encoder_2", "unet"] if te else ["unet"]
    with safe_open(folder / DIFFUSERS, "pt") as f:
        assert sorted({k.split(".")[0] for k in f.keys()}) == components
        packed = json.loads(f.metadata()["lora_adapter_metadata"])
    for c in components:  # each component's config, alpha kept
        assert packed[f"{c}.r"] == 4 and packed[f"{c}.lora_alpha"] == 8.0
    if te:
        assert packed["text_encoder_2.target_modules"] == ["k_proj", "out_proj", "q_proj", "v_proj"]
    with safe_open(folder / KOHYA, "pt") as f:
        f_keys = list(f.keys())
        prefixes = {k.split("_")[1] for k in f_keys}  # lora_<this>_<module path>
        meta = f.metadata()
    assert prefixes == ({"te1", "te2", "unet"} if te else {"unet"})
    # The original UNet's names, as kohya's SDXL files have them (e.g. input_blocks_3_1_...).
    unet_keys = {k.split(".")[0] for k in f_keys if k.startswith("lora_unet_")}
    assert unet_keys and all(
        k.startswith(
            ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")
        )
        for k in unet_keys
    ), sorted(unet_keys)[:3]
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_network_train_unet_only"] == str(not te)

    pipe = pipeline(tiny_sdxl_model, folder, DIFFUSERS)
    assert pipe.__class__.__name__ == "StableDiffusionXLPipeline"
    (config,) = pipe.unet.peft_config.values()
    assert (config.r, config.lora_alpha) == (4, 8.0)
    via_diffusers = render(pipe)
    assert np.abs(via_diffusers - base_render).mean() > 0.01  # the LoRA does something
    if te:  # both text encoders carry the trained LoRA
        plain = text_states(pipeline(tiny_sdxl_model))
        for before, after in zip(plain, text_states(pipe)):
            assert (after - before).abs().max().item() > 1e-3
    via_kohya = render(pipeline(tiny_sdxl_model, folder, KOHYA))
    np.testing.assert_allclose(via_kohya, via_diffusers, rtol=0, atol=1e-5)


def _mixed_sizes(root: Path) -> Path:
    """Six captioned images of different sizes and aspects: several buckets and crops."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    sizes = [(64, 64), (96, 64), (64, 96), (80, 64), (64, 48), (72, 72)]
    for i, (w, h) in enumerate(sizes):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"a photo of a {['red', 'blue'][i % 2]} square, big")
    return root


def test_sdxl_same_spec_same_bytes_with_everything_per_step(
    tiny_sdxl_model: Path, tmp_path: Path
) -> None:
    """Buckets, random crops, flips, caption dropout (so the frozen encoders run every step),
    LoRA dropout, offset noise and min-SNR: the same spec gives the same file, another seed
    another one."""
    data = _mixed_sizes(tmp_path / "data")
    options = dict(
        lora={"dropout": 0.1},
        data={
            "bucketing": True,
            "bucket_step": 16,
            "crop": "random",
            "flip_p": 0.5,
            "caption_dropout": 0.3,
        },
        steps=4,
        noise_offset=0.05,
        min_snr_gamma=5.0,
    )
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        runs[name] = _train(_spec(seed=seed, **options), tiny_sdxl_model, data, tmp_path / name)
    a, b, c = (sha256(tmp_path / name / DIFFUSERS) for name in "abc")
    assert a == b and a != c
    metrics, resolved = runs["a"].metrics, runs["a"].resolved
    assert metrics["latents_cached"] is False and metrics["text_cached"] is False
    assert resolved["noise_offset"] == 0.05 and resolved["min_snr_gamma"] == 5.0


def test_sdxl_unet_without_a_second_text_encoder_is_refused(
    tiny_sdxl_model: Path, tiny_image_dataset: Path, tmp_path: Path
) -> None:
    broken = shutil.copytree(tiny_sdxl_model, tmp_path / "model")
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(UserDataError, match="no text_encoder_2"):
        _train(_spec(steps=1), broken, tiny_image_dataset, tmp_path / "out")
