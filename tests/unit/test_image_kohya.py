"""kohya names of diffusers LoRA keys (UNet and text encoders, SD-1.x and SDXL) and the header
fields that say what was trained."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lorajobs.worker.trainers.image.kohya import diffusers_to_kohya, header_metadata

DOWN, UP = torch.ones(4, 32), torch.ones(32, 4)
STATE = {
    "unet.down_blocks.1.attentions.0.proj_in.lora.down.weight": DOWN,
    "unet.down_blocks.1.attentions.0.proj_in.lora.up.weight": UP,
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": DOWN,
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": UP,
}
TE2 = {
    "text_encoder_2.text_model.encoder.layers.1.self_attn.out_proj.lora_linear_layer.down.weight": DOWN,
    "text_encoder_2.text_model.encoder.layers.1.self_attn.out_proj.lora_linear_layer.up.weight": UP,
}


def test_sd1_text_encoder_modules_are_lora_te() -> None:
    out = diffusers_to_kohya(STATE, alpha=8.0)
    assert sorted(out) == [
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
        "lora_unet_down_blocks_1_attentions_0_proj_in.alpha",
        "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight",
        "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight",
    ]
    assert {out[k].item() for k in out if k.endswith(".alpha")} == {8.0}


def test_sdxl_text_encoders_are_lora_te1_and_te2() -> None:
    out = diffusers_to_kohya({**STATE, **TE2}, alpha=8.0, use_rslora=True, sdxl=True)
    prefixes = {k.split(".")[0].split("_text_model")[0] for k in out if "_te" in k}
    assert prefixes == {"lora_te1", "lora_te2"}
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight" in out
    assert {out[k].item() for k in out if k.endswith(".alpha")} == {16.0}  # 8 * sqrt(4)


def test_a_second_text_encoder_is_sdxl_only() -> None:
    with pytest.raises(ValueError, match="text_encoder_2"):
        diffusers_to_kohya({**STATE, **TE2}, alpha=8.0)


def _meta(**over: Any) -> dict[str, str]:
    args: dict[str, Any] = dict(
        name="n",
        rank=4,
        alpha=8.0,
        use_rslora=False,
        unet_config={},
        steps=3,
        seed=0,
        learning_rate=1e-3,
        resolution=64,
        captions=["a, b"],
        dataset="d",
        trigger=None,
        tensors_sha256="0" * 64,
    )
    return header_metadata(**{**args, **over})


def test_header_says_whether_the_text_encoder_trained() -> None:
    unet_only = _meta()
    assert unet_only["ss_network_train_unet_only"] == "True"
    assert unet_only["ss_text_encoder_lr"] == "0"
    both = _meta(text_encoder_lr=5e-5)
    assert both["ss_network_train_unet_only"] == "False"
    assert both["ss_text_encoder_lr"] == "5e-05"
    sdxl = _meta(unet_config={"addition_embed_type": "text_time"})
    assert sdxl["ss_base_model_version"] == "sdxl_base_v1-0"
    assert sdxl["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
