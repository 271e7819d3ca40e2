"""A tiny Flux.1 pipeline, built offline and byte-identically from configs.

The real architecture in miniature (random weights): a `FluxTransformer2DModel` with one double
and one single block, a T5 encoder built from a `T5Config`, a CLIP text encoder, a 16-channel
VAE with Flux's shift and scale, and Flux's flow-matching scheduler. The shapes obey Flux's own
constraints: the rotary axes (`axes_dims_rope`) sum to the head dim, `joint_attention_dim` is
T5's `d_model`, `pooled_projection_dim` is CLIP's pooled width, and `in_channels` is 4 x the
VAE's latent channels (latents are packed 2x2 into tokens).

`guidance=True` gives a guidance-distilled base (FLUX.1-dev's layout: a guidance embedding,
dynamic shifting); `guidance=False` FLUX.1-schnell's (no guidance embedding, fixed shift 1).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from lorajobs.worker.trainers.image.tiny import (
    _CORPUS,
    _build_tokenizer,
    _clip_config,
    _train_merges,
)

# T5's specials, with T5's ids: pad 0, eos 1, unk 2.
_T5_PAD, _T5_EOS, _T5_UNK = "<pad>", "</s>", "<unk>"
T5_MAX_LENGTH = 32  # tokens of T5 context: the transformer attends over these + the image's
T5_WIDTH = 32
CLIP_WIDTH = 32
LATENT_CHANNELS = 16


def _build_t5_tokenizer() -> Any:
    """A byte-level BPE over `_CORPUS` in a `PreTrainedTokenizerFast`, appending `</s>` as T5's
    tokenizer does. Merges come from `tiny._train_merges` (ties broken lexically) and ids are
    numbered canonically, so the tokenizer file is the same bytes in every process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=True)
    words: Counter[tuple[str, ...]] = Counter()
    for line in _CORPUS:
        for piece, _ in byte_level.pre_tokenize_str(line):
            words[tuple(piece)] += 1
    merges = _train_merges(words, 300)
    specials = [_T5_PAD, _T5_EOS, _T5_UNK]
    vocab: dict[str, int] = {s: i for i, s in enumerate(specials)}
    for sym in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[sym] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=_T5_UNK))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {_T5_EOS}", pair=f"$A {_T5_EOS} $B {_T5_EOS}", special_tokens=[(_T5_EOS, 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=_T5_PAD,
        eos_token=_T5_EOS,
        unk_token=_T5_UNK,
        model_max_length=T5_MAX_LENGTH,
    )


def build_tiny_flux_model(out: Path, *, seed: int = 0, guidance: bool = True) -> Path:
    """Write a tiny Flux.1 pipeline (a VAE downsampling 2x: 32 px → 16x16x16 latents →
    64 tokens) to `out` and return it. Reloads with
    `FluxPipeline.from_pretrained(out, local_files_only=True)`."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    clip_tokenizer = _build_tokenizer()
    t5_tokenizer = _build_t5_tokenizer()
    heads, head_dim = 4, 16  # a 64-wide stream: proj_out can span the 64-channel packed target
    # Each component seeded on its own: adding or reordering one never changes another.
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=CLIP_WIDTH,
        guidance_embeds=guidance,
        axes_dims_rope=(4, 4, 8),  # sums to head_dim
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_flux_vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        _clip_config(clip_tokenizer, hidden_size=CLIP_WIDTH, projection_dim=CLIP_WIDTH)
    )
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=T5_WIDTH,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX.1's T5-XXL
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    pipe = FluxPipeline(
        scheduler=_scheduler(guidance),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    out = Path(out)
    pipe.save_pretrained(out)
    return out


def _scheduler(guidance: bool) -> Any:
    """FLUX.1-dev's scheduler config (dynamic, resolution-dependent shift) or schnell's."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if guidance:
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def _tiny_flux_vae() -> Any:
    """A 2-block, 16-channel VAE with FLUX.1's latent shift and scale (no quant convs)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=32,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
