"""Flux.1 end to end on tiny Flux pipelines (dev-style with a guidance embedding, and
schnell-style without): the adapter loads in `FluxPipeline` and changes what it renders; the
kohya file, read by diffusers' own converter, plays like the diffusers file; prompt embeddings
are cached and the text encoders released; same spec, same bytes; 10 + resume + 10 steps ==
20 steps.

diffusers' kohya-Flux converter hard-codes FLUX.1's real widths for a single block's fused
`linear1` (q|k|v|mlp: 3072, 3072, 3072, 12288), so on the tiny model the comparison leaves
`linear1` out on the kohya side and the single blocks' q/k/v/proj_mlp on the diffusers side;
tests/unit/test_flux_kohya.py checks `linear1` through the same converter at the real widths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorajobs.jobspecs import parse_spec
from lorajobs.jobspecs.failures import Preempted, UserDataError
from lorajobs.jobspecs.models import ImageJobSpec
from lorajobs.storage.checkpoints import CheckpointStore
from lorajobs.worker.context import TrainOutput, WorkerContext
from lorajobs.worker.trainers.image.flux import default_targets
from lorajobs.worker.trainers.image.recipe import train
from tests.plugins.specs import WEIGHTS, sha256, spec_dict

pytestmark = pytest.mark.slow

DIFFUSERS = WEIGHTS["image"]
KOHYA = "fx.safetensors"
PROMPT = "a photo of a red circle"


def _spec(lora: dict[str, Any] | None = None, **training: Any) -> ImageJobSpec:
    spec = parse_spec(
        spec_dict(
            "image",
            "fx",
            "tiny-flux",
            "shapes",
            lora={"rank": 4, "alpha": 8.0, **(lora or {})},
            training={"steps": 6, "learning_rate": 1e-2, "resolution": 32, **training},
        )
    )
    assert isinstance(spec, ImageJobSpec)
    return spec


def _ctx(out: Path, job: str = "j", **kw: Any) -> WorkerContext:
    return WorkerContext(
        job_id=job, output_uri=out.as_uri(), cache_dir=out / "cache", threads=1, **kw
    )


def _train(spec: ImageJobSpec, model: Path, data: Path, out: Path) -> TrainOutput:
    out.mkdir(parents=True, exist_ok=True)
    return train(spec, model, data, out, _ctx(out))


def _pipe(model: Path) -> Any:
    from diffusers import FluxPipeline

    torch.set_num_threads(1)
    pipe = FluxPipeline.from_pretrained(model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _render(pipe: Any) -> np.ndarray:
    return pipe(
        PROMPT,
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=1.0,
        max_sequence_length=pipe.tokenizer_2.model_max_length,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]


def _comparable(out: Path, tmp: Path) -> tuple[Path, Path]:
    """(diffusers file, kohya file) restricted to what diffusers' converter can read at the
    tiny widths: no single-block q/k/v/proj_mlp, no `linear1`."""
    with safe_open(out / DIFFUSERS, "pt") as f:
        meta = f.metadata()
    single = ("single_transformer_blocks.0.attn.to_", ".proj_mlp.")
    d = {k: v for k, v in load_file(out / DIFFUSERS).items() if not any(s in k for s in single)}
    k = {n: v for n, v in load_file(out / KOHYA).items() if "_linear1." not in n}
    save_file(d, tmp / "d.safetensors", meta)
    save_file(k, tmp / "k.safetensors", {"format": "pt"})
    return tmp / "d.safetensors", tmp / "k.safetensors"


@pytest.fixture(scope="module")
def trained(
    tiny_flux_model: Path, tiny_image_dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[bool, tuple[Path, TrainOutput]]:
    """train_text_encoder → (adapter folder, result), default targets."""
    out = {}
    for te in (False, True):
        folder = tmp_path_factory.mktemp(f"flux-te{int(te)}")
        out[te] = (
            folder,
            _train(_spec(train_text_encoder=te), tiny_flux_model, tiny_image_dataset, folder),
        )
    return out


def test_flux_is_recognised_and_caches_prompt_embeddings(
    trained: dict[bool, tuple[Path, TrainOutput]], tiny_flux_model: Path
) -> None:
    from diffusers import FluxTransformer2DModel

    _, result = trained[False]
    r, m = result.resolved, result.metrics
    assert r["model_family"] == "flux-dev" and r["objective"] == "flow_matching"
    assert r["guidance_scale"] == 1.0 and r["timestep_sampling"] == "shift"
    config = FluxTransformer2DModel.load_config(tiny_flux_model, subfolder="transformer")
    assert r["target_modules"] == default_targets(config)
    assert m["latents_cached"] and m["text_cached"]
    assert not trained[True][1].metrics["text_cached"]  # CLIP trains: encoded every step
    assert m["final_loss"] < m["first_loss"]


def test_adapter_loads_in_flux_pipeline_and_kohya_file_plays_the_same(
    trained: dict[bool, tuple[Path, TrainOutput]], tiny_flux_model: Path, tmp_path: Path
) -> None:
    pipe = _pipe(tiny_flux_model)
    base = _render(pipe)
    for te, (out, result) in trained.items():
        assert result.files[:2] == [DIFFUSERS, KOHYA]
        pipe.load_lora_weights(out)
        assert (hasattr(pipe.text_encoder, "peft_config")) == te
        (config,) = pipe.transformer.peft_config.values()
        assert config.r == 4 and config.lora_alpha == 8
        tuned = _render(pipe)
        assert np.abs(tuned - base).max() > 1e-3, "the LoRA should change the render"
        pipe.unload_lora_weights()

        kohya = load_file(out / KOHYA)
        # linear1 = q|k|v|mlp-in fused: 4 LoRAs of rank 4 stacked; up block-diagonal.
        down = kohya["lora_unet_single_blocks_0_linear1.lora_down.weight"]
        up = kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"]
        inner = pipe.transformer.config.num_attention_heads * 16
        assert down.shape == (16, inner) and up.shape == (3 * inner + 4 * inner, 16)
        assert float(kohya["lora_unet_single_blocks_0_linear1.alpha"]) == 32.0  # 2.0 x 16
        assert torch.all(up[:inner, 4:] == 0) and torch.all(up[inner : 2 * inner, :4] == 0)
        assert any(k.startswith("lora_te1_") for k in kohya) == te

        d_file, k_file = _comparable(out, tmp_path)
        pipe.load_lora_weights(d_file)
        from_diffusers = _render(pipe)
        pipe.unload_lora_weights()
        pipe.load_lora_weights(k_file)  # through FluxPipeline.lora_state_dict's kohya converter
        from_kohya = _render(pipe)
        pipe.unload_lora_weights()
        assert np.abs(from_diffusers - base).max() > 1e-3
        np.testing.assert_allclose(from_kohya, from_diffusers, atol=1e-5, rtol=0)


def test_same_spec_same_bytes(
    trained: dict[bool, tuple[Path, TrainOutput]],
    tiny_flux_model: Path,
    tiny_image_dataset: Path,
    tmp_path: Path,
) -> None:
    out, _ = trained[False]
    _train(_spec(), tiny_flux_model, tiny_image_dataset, tmp_path / "again")
    assert sha256(tmp_path / "again" / DIFFUSERS) == sha256(out / DIFFUSERS)
    assert load_file(tmp_path / "again" / KOHYA).keys() == load_file(out / KOHYA).keys()


def test_resume_gives_the_same_adapter_as_a_straight_run(
    tiny_flux_model: Path, tiny_image_dataset: Path, tmp_path: Path
) -> None:
    spec = _spec(
        lora={"dropout": 0.1},
        steps=20,
        gradient_accumulation_steps=2,
        lr_scheduler="cosine",
        warmup_steps=3,
        checkpoint_every=5,
        seed=5,
        timestep_sampling="logit_normal",
    )
    bucket = tmp_path / "bucket"

    def ctx(job: str, stop: int | None = None) -> WorkerContext:
        store = CheckpointStore.for_job(bucket.as_uri(), job)
        return WorkerContext(
            job_id=job,
            output_uri=bucket.as_uri(),
            cache_dir=bucket,
            threads=1,
            checkpoints=store,
            stop_after_step=stop,
        )

    for d in ("straight", "first", "second"):
        (tmp_path / d).mkdir()
    straight = train(spec, tiny_flux_model, tiny_image_dataset, tmp_path / "straight", ctx("s"))
    with pytest.raises(Preempted, match="after step 10"):
        train(spec, tiny_flux_model, tiny_image_dataset, tmp_path / "first", ctx("split", 10))
    resumed = train(spec, tiny_flux_model, tiny_image_dataset, tmp_path / "second", ctx("split"))
    assert resumed.metrics["resumed_from_step"] == 10
    assert sha256(tmp_path / "second" / DIFFUSERS) == sha256(tmp_path / "straight" / DIFFUSERS)
    assert resumed.metrics["loss_curve"] == straight.metrics["loss_curve"]


def test_schnell_has_no_guidance_and_refuses_a_guidance_value(
    tiny_flux_schnell_model: Path, tiny_image_dataset: Path, tmp_path: Path
) -> None:
    with pytest.raises(UserDataError, match="training.guidance_scale: .*no guidance embedding"):
        _train(_spec(guidance_scale=3.5), tiny_flux_schnell_model, tiny_image_dataset, tmp_path)
    result = _train(
        _spec(timestep_sampling="uniform", steps=2), tiny_flux_schnell_model,
        tiny_image_dataset, tmp_path / "ok",
    )  # fmt: skip
    assert result.resolved["model_family"] == "flux-schnell"
    assert result.resolved["guidance_scale"] is None


def test_flow_settings_on_a_ddpm_base_and_ddpm_settings_on_flux_are_refused(
    tiny_image_model: Path, tiny_flux_model: Path, tiny_image_dataset: Path, tmp_path: Path
) -> None:
    with pytest.raises(UserDataError, match="training.timestep_sampling: only for flow-matching"):
        _train(_spec(timestep_sampling="uniform"), tiny_image_model, tiny_image_dataset, tmp_path)
    with pytest.raises(UserDataError, match="training.min_snr_gamma"):
        _train(_spec(min_snr_gamma=5.0), tiny_flux_model, tiny_image_dataset, tmp_path)


def test_aspect_buckets_train_on_non_square_images(tiny_flux_model: Path, tmp_path: Path) -> None:
    from PIL import Image

    data = tmp_path / "wide-and-tall"
    data.mkdir()
    for i, (w, h) in enumerate([(64, 32), (64, 32), (32, 64), (32, 64)]):
        Image.new("RGB", (w, h), (40 * i, 90, 200)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a plain picture number {i}\n", encoding="utf-8")
    spec = _spec(steps=2)
    spec = ImageJobSpec.model_validate(
        {**spec.model_dump(), "data": {"bucketing": True, "bucket_step": 8}}
    )
    result = _train(spec, tiny_flux_model, data, tmp_path / "out")
    assert result.metrics["steps"] == 2 and result.metrics["latents_cached"]
    cache = next((tmp_path / "out" / "cache" / "latents").iterdir())
    shapes = {tuple(load_file(p)["latents"].shape) for p in cache.glob("*.safetensors")}
    assert len(shapes) == 2, shapes  # a wide and a tall bucket, 16 latent channels each
    assert all(s[0] == 16 and s[1] % 2 == 0 and s[2] % 2 == 0 for s in shapes)


def test_samples_render_from_cached_prompt_embeddings_without_t5(
    tiny_flux_model: Path, tmp_path: Path
) -> None:
    from lorajobs.worker.trainers.image.flux import FluxEncoders, freeze_flux, load_flux_models
    from lorajobs.worker.trainers.image.flux_samples import FluxSampleRenderer
    from lorajobs.worker.trainers.loop import resolve_precision

    torch.set_num_threads(1)
    spec = ImageJobSpec.model_validate(
        {**_spec().model_dump(), "samples": {"prompts": [PROMPT], "num_inference_steps": 2}}
    )
    assert spec.samples is not None
    cpu = torch.device("cpu")
    base = load_flux_models(tiny_flux_model)
    freeze_flux(base, cpu, torch.float32)
    renderer = FluxSampleRenderer.for_flux(
        spec, tiny_flux_model, tmp_path, {"transformer": base.transformer},
        resolve_precision("no", cpu), cpu, _ctx(tmp_path), 1.0,
        FluxEncoders(base, cpu, torch.float32),
    )  # fmt: skip
    assert renderer is not None
    pipe = renderer._pipeline()
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None  # T5 never comes back
    cached = np.asarray(renderer._image(pipe, PROMPT))
    live = _pipe(tiny_flux_model)(
        PROMPT,
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=1.0,
        max_sequence_length=32,
        generator=torch.Generator().manual_seed(spec.samples.seed),
    ).images[0]
    assert np.array_equal(cached, np.asarray(live))


def test_cudnn_attention_is_off_for_the_flux_job_only(
    tiny_flux_model: Path, tiny_image_dataset: Path, tmp_path: Path
) -> None:
    # A reused Ray task worker trains other jobs after this one: they get the setting back,
    # whether the Flux job ended well or was stopped.
    during: list[bool] = []

    def ctx(job: str, stop: int | None = None) -> WorkerContext:
        return _ctx(
            tmp_path,
            job,
            report=lambda _: during.append(torch.backends.cuda.cudnn_sdp_enabled()),
            stop_after_step=stop,
        )

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        spec = _spec(steps=2)
        for d in ("done", "stopped"):
            (tmp_path / d).mkdir()
        train(spec, tiny_flux_model, tiny_image_dataset, tmp_path / "done", ctx("done"))
        assert during and not any(during)  # off at every progress report
        assert torch.backends.cuda.cudnn_sdp_enabled() is True
        with pytest.raises(Preempted):
            train(spec, tiny_flux_model, tiny_image_dataset, tmp_path / "stopped", ctx("s", 1))
        assert torch.backends.cuda.cudnn_sdp_enabled() is True
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
