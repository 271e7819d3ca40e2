"""Tiny Stable-Diffusion-1.x and SDXL pipelines and a synthetic image set, built offline.

Real architectures with random weights: tests and the demo train real LoRAs on them in seconds,
and nothing comes from a model hub. Both builders are deterministic given the seed.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTokenizer

# Enough words for a byte-level BPE to learn merges that cover the synthetic captions.
_CORPUS = [
    "a photo of a red circle on a white background",
    "a photo of a green square on a black background",
    "a photo of a blue triangle on a grey background",
    "a painting of a yellow star in the sky",
    "a drawing of a small cat sitting on a chair",
    "a picture of a big dog running in the park",
    "an image of a purple gradient with soft light",
    "a cyan orange magenta pattern of stripes and dots",
    "a close up portrait of a person smiling",
    "a landscape with mountains trees and a river at sunset",
]

# (name, rgb) pairs for the synthetic set: distinct colours the LoRA can learn to tie to words.
_COLOURS = [
    ("red", (220, 40, 40)),
    ("green", (40, 180, 60)),
    ("blue", (40, 70, 220)),
    ("yellow", (230, 210, 40)),
]
_SHAPES = ["circle", "square"]

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_MAX_LENGTH = 77


def _train_merges(words: Counter[tuple[str, ...]], max_merges: int) -> list[tuple[str, str]]:
    """Byte-level BPE training: merge the most frequent pair until none occurs twice.

    Written out (tens of lines) rather than using `tokenizers`' trainer because that one breaks
    frequency ties in hash order, which gives different merges, hence different tokenizers,
    per process. Here ties go to the lexically smallest pair.
    """
    merges: list[tuple[str, str]] = []
    for _ in range(max_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        words = Counter({_merge(word, best): count for word, count in words.items()})
    return merges


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _build_tokenizer(max_merges: int = 400) -> CLIPTokenizer:
    """A CLIP tokenizer whose byte-level BPE is trained on `_CORPUS`, the same in every process."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    specials = {"bos_token": _BOS, "eos_token": _EOS, "unk_token": _EOS, "pad_token": _EOS}
    # An empty CLIPTokenizer lends its own normalizer and pre-tokenizer (the `tokenizers`
    # library's byte-level pipeline), so training sees text exactly as encoding will.
    backend = CLIPTokenizer(vocab={_BOS: 0, _EOS: 1}, merges=[], **specials).backend_tokenizer
    words: Counter[tuple[str, ...]] = Counter()
    captions = [f"a photo of a {c} {s}" for c, _ in _COLOURS for s in _SHAPES]
    for line in _CORPUS + captions:
        text = backend.normalizer.normalize_str(line)
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text):
            words[tuple(piece[:-1]) + (piece[-1] + "</w>",)] += 1
    merges = _train_merges(words, max_merges)
    # Canonical ids: specials, every byte alone and at a word's end (so any text encodes
    # without unk), then merge results in merge order.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [_BOS, _EOS] + alphabet + [c + "</w>" for c in alphabet]
    tokens += [a + b for a, b in merges]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}  # first occurrence wins
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=_MAX_LENGTH, **specials)


# The tiny UNet's shape, SD-1.x and SDXL alike (64 px images, 32x32x4 latents).
_UNET_SHAPE = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    # Attention only at the 16x16 level: at 32x32 self-attention over 1024 tokens makes a CPU
    # step ~4x slower for no benefit to tests.
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=8,
    norm_num_groups=32,
)


def build_tiny_image_model(out: Path, *, seed: int = 0) -> Path:
    """Write a tiny SD-1.x pipeline (64 px images, 32x32 latents) to `out` and return it.

    Reloads with `StableDiffusionPipeline.from_pretrained(out, local_files_only=True)`.
    """
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = _build_tokenizer()
    # Each component is seeded on its own so adding or reordering one never changes another.
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**_UNET_SHAPE, cross_attention_dim=32)
    torch.manual_seed(seed + 1)
    vae = _tiny_vae(scaling_factor=0.18215)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_clip_config(tokenizer, hidden_size=32, projection_dim=32))
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = Path(out)
    pipe.save_pretrained(out)
    return out


def build_tiny_sdxl_model(out: Path, *, seed: int = 0) -> Path:
    """Write a tiny SDXL pipeline (64 px images, 32x32 latents) to `out` and return it.

    SDXL's architecture in miniature: two text encoders (a CLIPTextModel and a
    CLIPTextModelWithProjection of another width, so their hidden states concatenate to the
    UNet's cross-attention width), a UNet with `text_time` added conditioning (pooled text
    embeds + six size/crop ids), linear transformer projections, and SDXL's VAE scaling factor
    and Euler scheduler. Reloads with
    `StableDiffusionXLPipeline.from_pretrained(out, local_files_only=True)`.
    """
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _build_tokenizer()
    hidden_1, hidden_2, projection = 32, 48, 40
    time_embed_dim = 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **_UNET_SHAPE,
        cross_attention_dim=hidden_1 + hidden_2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # (original h, w, crop top, left, target h, w) embedded, plus text_encoder_2's pool.
        projection_class_embeddings_input_dim=6 * time_embed_dim + projection,
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae(scaling_factor=0.13025)  # SDXL's VAE factor
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_clip_config(tokenizer, hidden_size=hidden_1, projection_dim=32))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(
        _clip_config(tokenizer, hidden_size=hidden_2, projection_dim=projection)
    )
    scheduler = EulerDiscreteScheduler(  # as SDXL base ships; training reads it as DDPM
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=_build_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    out = Path(out)
    pipe.save_pretrained(out)
    return out


def _tiny_vae(*, scaling_factor: float) -> AutoencoderKL:
    """A 2-block VAE: 64 px images to 32x32x4 latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def _clip_config(
    tokenizer: CLIPTokenizer, *, hidden_size: int, projection_dim: int
) -> CLIPTextConfig:
    """A 2-layer CLIP text encoder config over `tokenizer`'s vocabulary."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_MAX_LENGTH,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def make_image_dataset(out: Path, *, n: int = 8, size: int = 64, seed: int = 0) -> Path:
    """Write `n` PNGs of coloured shapes on soft gradients, each with a same-name .txt caption.

    Learnable on purpose: a few colours and two shapes, so a diffusion loss can fall quickly.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    for i in range(n):
        colour, rgb = _COLOURS[i % len(_COLOURS)]
        shape = _SHAPES[(i // len(_COLOURS)) % len(_SHAPES)]
        # Light background gradient so images are not flat, with a jittered shape on top.
        background = 200 + 40 * (xx * 0.5 + yy * 0.5)
        img = np.stack([background] * 3, axis=-1)
        cx, cy = (0.5 + rng.uniform(-0.1, 0.1, size=2)) * size
        radius = size * rng.uniform(0.22, 0.3)
        if shape == "circle":
            mask = (xx * size - cx) ** 2 + (yy * size - cy) ** 2 <= radius**2
        else:
            mask = (np.abs(xx * size - cx) <= radius) & (np.abs(yy * size - cy) <= radius)
        img[mask] = rgb
        name = f"{i:04d}_{colour}_{shape}"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out / f"{name}.png")
        (out / f"{name}.txt").write_text(f"a photo of a {colour} {shape}\n", encoding="utf-8")
    return out
