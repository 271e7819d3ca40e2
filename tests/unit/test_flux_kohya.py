"""Flux kohya names and fusion, checked through diffusers' own converter at FLUX.1's real
widths (3072 inner, 12288 MLP), with LoRA tensors only (no model); and the sigma sampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorajobs.jobspecs.failures import UserDataError
from lorajobs.jobspecs.models import ImageJobSpec
from lorajobs.worker.trainers.image.flux import check_packing, default_targets, sample_sigmas
from lorajobs.worker.trainers.image.flux_names import flux_to_kohya, kohya_name

INNER, MLP = 3072, 12288
DOUBLE = {"attn.to_q": INNER, "attn.to_k": INNER, "attn.to_v": INNER, "attn.add_q_proj": INNER}
DOUBLE |= {"attn.add_k_proj": INNER, "attn.add_v_proj": INNER, "ff.net.2": INNER}
SINGLE = {"attn.to_q": INNER, "attn.to_k": INNER, "attn.to_v": INNER, "proj_mlp": MLP}


def _lora(modules: dict[str, tuple[int, int]], rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {}
    for module, (out, inp) in modules.items():
        state[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, inp, generator=g)
        state[f"transformer.{module}.lora_B.weight"] = torch.randn(out, rank, generator=g)
    return state


def _widths() -> dict[str, int]:
    w = {f"transformer.transformer_blocks.0.{m}": o for m, o in DOUBLE.items()}
    return w | {f"transformer.single_transformer_blocks.0.{m}": o for m, o in SINGLE.items()}


@pytest.mark.parametrize(
    ("single", "rank", "alpha", "rslora"),
    [
        (list(SINGLE), 4, 8.0, False),  # every member of linear1: block-diagonal, rank 16
        (["attn.to_q", "attn.to_k", "attn.to_v"], 4, 3.0, False),  # proj_mlp untrained
        (["proj_mlp", "attn.to_v"], 2, 5.0, True),
    ],
)
def test_fused_kohya_file_reads_back_through_diffusers_exactly(
    single: list[str], rank: int, alpha: float, rslora: bool, tmp_path: Path
) -> None:
    from diffusers import FluxPipeline

    modules = {f"transformer_blocks.0.{m}": (o, INNER) for m, o in DOUBLE.items()}
    modules["transformer_blocks.0.ff.net.2"] = (INNER, MLP)
    modules |= {f"single_transformer_blocks.0.{m}": (SINGLE[m], INNER) for m in single}
    state = _lora(modules, rank)
    kohya = flux_to_kohya(state, rank, alpha, rslora, _widths())
    save_file(kohya, tmp_path / "k.safetensors")
    back = FluxPipeline.lora_state_dict(tmp_path / "k.safetensors")
    back = back[0] if isinstance(back, tuple) else back

    scale = alpha / (rank**0.5 if rslora else rank)
    x = torch.randn(MLP, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for module, (_, inp) in modules.items():
        a = state[f"transformer.{module}.lora_A.weight"].double()
        b = state[f"transformer.{module}.lora_B.weight"].double()
        want = scale * b @ (a @ x[:inp])
        a2 = back[f"transformer.{module}.lora_A.weight"].double()
        b2 = back[f"transformer.{module}.lora_B.weight"].double()
        got = b2 @ (a2 @ x[:inp])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4, msg=module)
    # Members that carry no LoRA get none back (zero rows in the fused up-projection).
    for member in set(SINGLE) - set(single):
        key = f"transformer.single_transformer_blocks.0.{member}.lora_B.weight"
        assert key not in back or torch.all(back[key] == 0)


def test_kohya_names_are_the_original_block_names() -> None:
    assert kohya_name("transformer_blocks.3.attn.add_k_proj") == (
        "lora_unet_double_blocks_3_txt_attn_qkv",
        1,
    )
    assert kohya_name("transformer_blocks.0.ff_context.net.2") == (
        "lora_unet_double_blocks_0_txt_mlp_2",
        None,
    )
    assert kohya_name("single_transformer_blocks.7.proj_mlp") == (
        "lora_unet_single_blocks_7_linear1",
        3,
    )
    assert kohya_name("single_transformer_blocks.7.proj_out")[0].endswith("_linear2")
    with pytest.raises(ValueError, match="x_embedder: no kohya name"):
        kohya_name("x_embedder")


def test_default_targets_name_each_single_block_proj_out_not_the_final_one() -> None:
    targets = default_targets({"num_single_layers": 2})
    assert "proj_out" not in targets and "single_transformer_blocks.1.proj_out" in targets
    assert {"attn.to_q", "ff_context.net.2", "proj_mlp", "attn.to_add_out"} <= set(targets)


def _spec(**training: object) -> ImageJobSpec:
    return ImageJobSpec.model_validate(
        {
            "kind": "image",
            "name": "s",
            "base_model": "m",
            "dataset": "d",
            "training": {"steps": 1, **training},
        }
    )


def test_sigma_sampling() -> None:
    dynamic = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}
    dynamic |= {"base_image_seq_len": 256, "max_image_seq_len": 4096}

    def draw(spec: ImageJobSpec, config: dict[str, object], tokens: int) -> torch.Tensor:
        return sample_sigmas(spec, config, 4000, tokens, torch.Generator().manual_seed(0))

    uniform = draw(_spec(timestep_sampling="uniform"), dynamic, 256)
    assert 0 <= float(uniform.min()) and float(uniform.max()) <= 1
    assert abs(float(uniform.mean()) - 0.5) < 0.02 and float(uniform.std()) > 0.28
    normal = draw(_spec(timestep_sampling="logit_normal"), dynamic, 256)
    assert abs(float(normal.mean()) - 0.5) < 0.02 and float(normal.std()) < 0.22  # centred
    small, big = draw(_spec(), dynamic, 256), draw(_spec(), dynamic, 4096)
    # The same draws, shifted toward noise by exp(mu): mu 0.5 at 256 tokens, 1.15 at 4096.
    assert torch.all(big > small) and torch.all(small > normal)
    fixed = draw(_spec(), {"shift": 3.0}, 256)
    torch.testing.assert_close(fixed, 3 * normal / (1 + 2 * normal))


def test_image_sides_must_pack_into_2x2_latent_tokens() -> None:
    check_packing(_spec(resolution=512), 8)
    with pytest.raises(UserDataError, match="training.resolution: 520 is not a multiple of 16"):
        check_packing(_spec(resolution=520), 8)
    bucketed = ImageJobSpec.model_validate(
        {
            "kind": "image",
            "name": "s",
            "base_model": "m",
            "dataset": "d",
            "training": {"steps": 1, "resolution": 512},
            "data": {"bucketing": True, "bucket_step": 24},
        }
    )
    with pytest.raises(UserDataError, match="data.bucket_step: 24 is not a multiple of 16"):
        check_packing(bucketed, 8)
