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
    assert "lora_unet_input_blocks_4_1_proj_in.lora_down.weight" in out  # the original name
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


# diffusers path -> the name kohya's own SDXL files (and A1111 / ComfyUI) use, SDXL base layout.
SGM = [
    (
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
    ),
    ("down_blocks.2.attentions.1.proj_out", "input_blocks.8.1.proj_out"),
    (
        "mid_block.attentions.0.transformer_blocks.3.ff.net.2",
        "middle_block.1.transformer_blocks.3.ff.net.2",
    ),
    (
        "up_blocks.0.attentions.2.transformer_blocks.0.attn2.to_k",
        "output_blocks.2.1.transformer_blocks.0.attn2.to_k",
    ),
    ("up_blocks.1.attentions.0.proj_in", "output_blocks.3.1.proj_in"),
    ("down_blocks.0.resnets.1.conv2", "input_blocks.2.0.out_layers.3"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    ("up_blocks.2.resnets.0.conv_shortcut", "output_blocks.6.0.skip_connection"),
    ("mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
    ("time_embedding.linear_1", "time_embed.0"),
    ("add_embedding.linear_2", "label_emb.0.2"),
    ("conv_in", "input_blocks.0.0"),
]


@pytest.mark.parametrize("path,original", SGM, ids=[p for p, _ in SGM])
def test_sdxl_unet_paths_get_their_original_names(path: str, original: str) -> None:
    from lorajobs.worker.trainers.image.kohya import SDXL_UNET
    from lorajobs.worker.trainers.image.sgm_names import sgm_path

    assert sgm_path(path, SDXL_UNET) == original


def test_diffusers_maps_our_sdxl_names_back() -> None:
    """diffusers' own converter (what `load_lora_weights` runs on a kohya SDXL file) turns every
    original name we write back into the diffusers module it came from."""
    from types import SimpleNamespace

    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    from lorajobs.worker.trainers.image.kohya import SDXL_UNET

    attention = [p for p, _ in SGM if ".attentions." in p]
    state = {f"unet.{p}.lora.down.weight": DOWN for p in attention}
    kohya = diffusers_to_kohya(state, alpha=8.0, sdxl=True)
    downs = {k: v for k, v in kohya.items() if k.endswith("lora_down.weight")}
    back = _maybe_map_sgm_blocks_to_diffusers(dict(downs), SimpleNamespace(**SDXL_UNET))
    # It renumbers the blocks; its key converter then renames the block words.
    words = (
        ("input_blocks", "down_blocks"),
        ("middle_block", "mid_block"),
        ("output_blocks", "up_blocks"),
    )
    renamed = []
    for key in back:
        for sgm, diffusers in words:
            key = key.replace(sgm, diffusers)
        renamed.append(key)
    assert sorted(renamed) == sorted(
        "lora_unet_" + p.replace(".", "_") + ".lora_down.weight" for p in attention
    )
