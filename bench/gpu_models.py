"""The text and Flux sections of `bench/gpu_check.py`.

Text: a ~1B random Llama, sequences of exactly `seq` tokens (every row is longer and is
truncated, so no batch pads), LoRA r=16 on the attention projections — lorajobs' text trainer
vs a bare PEFT loop (frozen base in bf16, LoRA fp32 under bf16 autocast, AdamW, clipping at 1),
and the same with a bitsandbytes nf4 base, gradient checkpointing and 8-bit AdamW vs a bare
QLoRA loop with those settings.

Flux: a bare flow-matching LoRA step on a Flux-shaped transformer (rectified flow: x_t = (1-t)
x0 + t noise, the target noise - x0, t = sigmoid(normal), guidance 3.5), cached latents and
text embeddings, and the same on a base quantized by lorajobs' `quantize_flux_transformer`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from gpu_sections import (
    FLUX,
    FLUX_TINY,
    IMAGE_TARGETS,
    LLAMA_1B,
    LR,
    RANK,
    TEXT_TARGETS,
    Setup,
    _reset_peak,
    compare,
    run_ours,
    timed_loop,
)

# -- text ----------------------------------------------------------------------------------------


def _sizes(s: Setup) -> tuple[int, int]:
    """(sequence length, batch)."""
    return (64, 2) if s.tiny else (1024, 4)


def build_llama_folder(s: Setup) -> tuple[Path, Path]:
    """(model folder, JSONL file): the tiny Llama's tokenizer with a ~1B Llama (tiny: the
    tiny Llama itself), and rows each longer than the sequence length."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lorajobs.worker.trainers.text.tiny import _texts, build_tiny_text_model

    model = s.work / "llama"
    if not (model / "config.json").exists():
        build_tiny_text_model(model)
        tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
        tok.model_max_length = 8192
        tok.save_pretrained(model)
        if not s.tiny:
            cfg = LlamaConfig(
                **LLAMA_1B,
                pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                tie_word_embeddings=False,
            )
            torch.manual_seed(0)
            with torch.device(s.device):
                big = LlamaForCausalLM(cfg)
            for stale in model.glob("model*.safetensors*"):  # the tiny weights: never loaded
                stale.unlink()
            big.to(torch.bfloat16).save_pretrained(model)
            del big
    data = s.work / "text.jsonl"
    if not data.exists():
        tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
        seq, _ = _sizes(s)
        per = max(1, len(tok(" ".join(_texts(8, 1))).input_ids) // 8)  # tokens per sentence
        rows = [" ".join(_texts(seq // per + 16, seed)) for seed in range(32)]
        assert all(len(tok(r).input_ids) > seq for r in rows)
        data.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return model, data


def ours_text(s: Setup, model: Path, data: Path, steps: int, **training: Any) -> dict[str, Any]:
    from lorajobs.jobspecs.models import TextJobSpec

    seq, batch = _sizes(s)
    spec = TextJobSpec(
        kind="text",
        name="gpu-check",
        base_model="m",
        dataset="d",
        lora={"rank": RANK, "alpha": RANK},
        training={
            "steps": s.warmup + steps,
            "batch_size": batch,
            "max_seq_length": seq,
            "learning_rate": LR,
            "checkpoint_every": 0,
            "mixed_precision": "bf16",
            **training,
        },
        data={"format": "text"},
    )
    return run_ours(s, "text", spec, model, data)


def bare_text(s: Setup, model: Path, data: Path, steps: int, qlora: bool) -> dict[str, Any]:
    """The loop a user writes; `qlora`: bitsandbytes nf4 (double quant, bf16 compute),
    `prepare_model_for_kbit_training` with gradient checkpointing, 8-bit AdamW."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    seq, batch = _sizes(s)
    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    rows = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    ids = torch.tensor([tok(r).input_ids[:seq] for r in rows])
    _reset_peak(s)
    if qlora:
        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        m = AutoModelForCausalLM.from_pretrained(
            model,
            local_files_only=True,
            quantization_config=q,
            device_map={"": 0},
            dtype=torch.bfloat16,
        )
        m = prepare_model_for_kbit_training(
            m,
            use_gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    else:
        m = AutoModelForCausalLM.from_pretrained(model, local_files_only=True, dtype=s.dtype)
        m.to(s.device)
    m.config.use_cache = False
    m = get_peft_model(
        m, LoraConfig(task_type="CAUSAL_LM", r=RANK, lora_alpha=RANK, target_modules=TEXT_TARGETS)
    )
    params = [p for p in m.parameters() if p.requires_grad]
    if qlora:
        import bitsandbytes as bnb

        opt: torch.optim.Optimizer = bnb.optim.AdamW8bit(params, lr=LR, weight_decay=0.0)
    else:
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    m.train()
    ids = ids.to(s.device)
    mask = torch.ones_like(ids)
    pos = [0]

    def step() -> None:
        idx = [(pos[0] + i) % len(ids) for i in range(batch)]
        pos[0] += batch
        with s.autocast():
            loss = m(input_ids=ids[idx], attention_mask=mask[idx], labels=ids[idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    return timed_loop(s, step, steps)


def _no_bnb(s: Setup) -> dict[str, Any] | None:
    return None if s.bnb else {"skipped": "needs a CUDA GPU and bitsandbytes"}


def text(s: Setup) -> dict[str, Any]:
    model, data = build_llama_folder(s)
    res = compare(
        ours_text(s, model, data, s.steps), bare_text(s, model, data, s.steps, qlora=False)
    )
    return {**res, "seq": _sizes(s)[0], "batch": _sizes(s)[1]}


def text_nf4(s: Setup) -> dict[str, Any]:
    if (skip := _no_bnb(s)) is not None:
        return skip
    model, data = build_llama_folder(s)
    qlora = {"quantize_base": "nf4", "gradient_checkpointing": True, "optimizer": "adamw8bit"}
    steps = max(4, 2 * s.steps // 3)
    return compare(
        ours_text(s, model, data, steps, **qlora), bare_text(s, model, data, steps, qlora=True)
    )


def text_fp8(s: Setup) -> dict[str, Any]:
    """Ours only: fp8 is float8 weight storage of lorajobs' own (no bare twin to compare)."""
    if s.device.type != "cuda":
        return {"skipped": "needs a CUDA GPU"}
    model, data = build_llama_folder(s)
    return compare(ours_text(s, model, data, max(4, s.steps // 3), quantize_base="fp8"), None)


# -- Flux ----------------------------------------------------------------------------------------


def _flux_model(s: Setup) -> Any:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device(s.device):
        model = FluxTransformer2DModel(**(FLUX_TINY if s.tiny else FLUX))
    return model.to(s.dtype)


def bare_flux_step(s: Setup, model: Any, batch: int = 1) -> Any:
    """One flow-matching LoRA step's closure over `model` (LoRA added here)."""
    from peft import LoraConfig

    cfg = model.config
    side = 8 if s.tiny else 64  # 1024 px -> 128x128 latents -> 2x2 patches: 64x64 tokens
    n_txt = 16 if s.tiny else 512  # T5 length
    model.requires_grad_(False)
    torch.manual_seed(0)
    model.add_adapter(
        LoraConfig(
            r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=IMAGE_TARGETS
        )
    )
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    g = torch.Generator(s.device).manual_seed(0)
    dev, dt = s.device, s.dtype
    x0 = torch.randn(batch, side * side, cfg.in_channels, device=dev, generator=g).to(dt)
    txt = torch.randn(batch, n_txt, cfg.joint_attention_dim, device=dev, generator=g).to(dt)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, device=dev, generator=g).to(dt)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(dev, dt)
    txt_ids = torch.zeros(n_txt, 3, device=dev, dtype=dt)
    guidance = torch.full((batch,), 3.5, device=dev)
    model.train()

    def step() -> None:
        noise = torch.randn(x0.shape, device=dev, generator=g).to(dt)
        t = torch.sigmoid(torch.randn(batch, device=dev, generator=g))
        xt = ((1 - t.view(-1, 1, 1)) * x0.float() + t.view(-1, 1, 1) * noise.float()).to(dt)
        with s.autocast():
            pred = model(
                hidden_states=xt,
                encoder_hidden_states=txt,
                pooled_projections=pooled,
                timestep=t,
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=guidance,
                return_dict=False,
            )[0]
        loss = F.mse_loss(pred.float(), noise.float() - x0.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    return step


def build_flux_folder(s: Setup) -> tuple[Path, Path, int]:
    """(pipeline folder, image folder, resolution) for lorajobs' Flux trainer on the `flux`
    section's transformer: the tiny offline Flux pipeline with the transformer swapped for the
    `FLUX` sizes, an 8x 16-channel VAE (narrow: it encodes each image once, before the timed
    steps), a one-layer T5 as wide as `joint_attention_dim` and a CLIP-L-wide (768) CLIP, with
    the T5 tokenizer's length raised to 512, the bare step's text length. Tiny: the test
    suite's tiny Flux pipeline at 32 px."""
    import json
    import shutil

    from lorajobs.worker.trainers.image.flux_tiny import build_tiny_flux_model
    from lorajobs.worker.trainers.image.tiny import make_image_dataset

    root = s.work / "flux"
    model, data = build_tiny_flux_model(root / "model"), root / "data"
    resolution = 32 if s.tiny else 1024
    make_image_dataset(data, n=4, size=resolution)
    if s.tiny:
        return model, data, resolution
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from lorajobs.worker.trainers.image.tiny import _build_tokenizer, _clip_config

    t5_vocab = json.loads((model / "text_encoder_2" / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    with torch.device(s.device):  # random init on the GPU: seconds, not a minute
        transformer = FluxTransformer2DModel(**FLUX)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=16,
            layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(32, 32, 64, 64),
            norm_num_groups=32,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
            sample_size=resolution,
        )
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=t5_vocab,
                d_model=FLUX["joint_attention_dim"],
                d_kv=64,
                d_ff=1024,
                num_layers=1,
                num_heads=8,
                feed_forward_proj="gated-gelu",
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
            )
        )
        clip = CLIPTextModel(_clip_config(_build_tokenizer(), hidden_size=768, projection_dim=768))
    parts = (
        ("transformer", transformer),
        ("vae", vae),
        ("text_encoder_2", t5),
        ("text_encoder", clip),
    )
    for name, module in parts:
        shutil.rmtree(model / name)
        module.to(torch.bfloat16).save_pretrained(model / name)
    del transformer, vae, t5, clip
    cfg_path = model / "tokenizer_2" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "model_max_length": 512}))
    return model, data, resolution


def flux_lorajobs_step(s: Setup) -> dict[str, Any] | None:
    """lorajobs' Flux trainer (its real `train()`: cached latents and prompt embeddings, the
    flow-matching loss, guidance 3.5) on the `flux` section's transformer, batch 1, LoRA r=16 on
    the same attention projections as the bare step."""
    from lorajobs.jobspecs.models import ImageJobSpec

    model, data, resolution = build_flux_folder(s)
    spec = ImageJobSpec(
        kind="image",
        name="gpu-check-flux",
        base_model="m",
        dataset="d",
        lora={"rank": RANK, "alpha": RANK, "target_modules": IMAGE_TARGETS},
        training={
            "steps": s.warmup + s.steps,
            "batch_size": 1,
            "resolution": resolution,
            "learning_rate": LR,
            "checkpoint_every": 0,
            "mixed_precision": "bf16",
            "guidance_scale": 3.5,
        },
    )
    return run_ours(s, "image", spec, model, data)


def flux(s: Setup) -> dict[str, Any]:
    # As lorajobs' Flux trainer does on CUDA (cuDNN's attention fails in this backward): both
    # sides then run the same attention kernels.
    torch.backends.cuda.enable_cudnn_sdp(False)
    ours = flux_lorajobs_step(s)
    model = _flux_model(s)
    _reset_peak(s)  # from the bf16 base on the GPU (its fp32 random init came first)
    step = bare_flux_step(s, model)
    res = compare(ours, timed_loop(s, step, s.steps))
    return {**res, "blocks": "2 double + 4 single", "tokens": "4096 image + 512 text"}


def _flux_quantized(s: Setup, mode: str) -> dict[str, Any]:
    """The bare Flux step on a base quantized by lorajobs' `quantize_flux_transformer`; peak
    memory counts from the quantized base (its bf16 build comes first)."""
    torch.backends.cuda.enable_cudnn_sdp(False)  # as `flux`
    from lorajobs.worker.trainers.quantize import quantize_flux_transformer

    model = quantize_flux_transformer(_flux_model(s), mode, s.device)
    _reset_peak(s)
    step = bare_flux_step(s, model)
    return {"lorajobs": None, "bare": timed_loop(s, step, max(4, 2 * s.steps // 3))}


def flux_nf4(s: Setup) -> dict[str, Any]:
    return _no_bnb(s) or _flux_quantized(s, "nf4")


def flux_fp8(s: Setup) -> dict[str, Any]:
    return _flux_quantized(s, "fp8")  # torch only: runs on the CPU in --tiny too
