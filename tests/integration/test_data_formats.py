"""Every dataset format trains a tiny model through the data layer's contract alone.

These drive `build_*_dataset → batch(step) → forward/backward` directly with PEFT LoRA on the
tiny offline models, independent of the trainers (which call the same functions): text formats
(padded and packed) must halve their train and eval loss; image formats (with bucketing, flips,
caption options and the latent cache) must train with finite losses, one bucket per batch.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lorajobs.jobspecs.models import ImageJobSpec, TextJobSpec
from lorajobs.worker.trainers.image.data import build_image_dataset
from lorajobs.worker.trainers.image.latents import (
    LatentCache,
    cache_key,
    cache_plan,
    dataset_digest,
)
from lorajobs.worker.trainers.text.data import build_text_dataset

pytestmark = pytest.mark.slow

_COLOURS = ["red", "blue", "green", "yellow"]
_ANSWERS = {
    "red": "the cat likes red apples.",
    "blue": "a dog sees blue trains.",
    "green": "my friend finds green stones.",
    "yellow": "our teacher paints old songs.",
}


def _text_rows(fmt: str, n: int = 32) -> list[dict]:
    """A learnable set: the reply is a fixed sentence chosen by the colour in the prompt."""
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        c = rng.choice(_COLOURS)
        q, a = f"which sentence goes with {c}?", _ANSWERS[c]
        rows.append(
            {
                "text": {"text": f"{q} {a}"},
                "completion": {"prompt": q + "\n", "completion": a},
                "alpaca": {"instruction": q, "input": "", "output": a},
                "chat": {
                    "messages": [
                        {"role": "user", "content": q},
                        {"role": "assistant", "content": a},
                    ]
                },
            }[fmt]
        )
    return rows


def _text_spec(fmt: str, packing: bool) -> TextJobSpec:
    return TextJobSpec.model_validate(
        {
            "kind": "text",
            "name": "t",
            "base_model": "b",
            "dataset": "d",
            "training": {
                "steps": 60,
                "batch_size": 4,
                "max_seq_length": 256,
                "seed": 0,
                "learning_rate": 1e-2,
            },
            "data": {"format": fmt, "packing": packing, "validation_split": 0.125},
        }
    )


@pytest.mark.parametrize(
    ("fmt", "packing"),
    [
        ("text", False),
        ("completion", False),
        ("alpaca", False),
        ("chat", False),
        ("completion", True),
        ("chat", True),
    ],
)
def test_text_format_trains_and_loss_halves(
    tmp_path: Path, tiny_text_model: Path, fmt: str, packing: bool
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    f = tmp_path / "train.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in _text_rows(fmt)), encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(tiny_text_model, local_files_only=True)
    spec = _text_spec(fmt, packing)
    ds = build_text_dataset(f, spec, tok)
    assert len(ds.validation) == 4 and len(ds.examples) == 28

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_text_model, local_files_only=True)
    model = get_peft_model(
        model,
        LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=spec.target_modules()),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.training.learning_rate)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            total = count = 0.0
            for b in ds.eval_batches():
                total += float(model(**b.model_inputs(), use_cache=False).loss) * b.num_label_tokens
                count += b.num_label_tokens
        model.train()
        return total / count

    before = eval_loss()
    losses = []
    for step in range(spec.training.steps):
        batch = ds.batch(step)
        loss = model(**batch.model_inputs(), use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    after = eval_loss()
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5]), (losses[:5], losses[-10:])
    assert after < 0.5 * before, (before, after)


def _write_images(root: Path, fmt: str) -> Path:
    """Coloured shapes of three aspect ratios, laid out in `fmt`."""
    sizes = [(64, 64), (96, 48), (48, 96)]
    rows = []
    for i in range(6):
        c = _COLOURS[i % 4]
        w, h = sizes[i % 3]
        arr = np.full((h, w, 3), 230, dtype=np.uint8)
        arr[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = [
            (200, 30, 30),
            (30, 30, 200),
            (30, 180, 30),
            (220, 200, 30),
        ][i % 4]
        folder = root / "4_shape" if fmt == "kohya" else root / "img"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{i:02d}.png"
        Image.fromarray(arr).save(folder / name)
        caption = f"{c}, square, plain background"
        if fmt == "imagefolder":
            rows.append({"file_name": f"img/{name}", "text": caption})
        elif not (fmt == "kohya" and i % 2):  # kohya: half fall back to the concept
            (folder / name).with_suffix(".txt").write_text(caption, encoding="utf-8")
    if rows:
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _image_spec(**data) -> ImageJobSpec:
    return ImageJobSpec.model_validate(
        {
            "kind": "image",
            "name": "i",
            "base_model": "b",
            "dataset": "d",
            "training": {
                "steps": 4,
                "batch_size": 2,
                "resolution": 64,
                "seed": 0,
                "learning_rate": 1e-3,
            },
            "data": {"bucketing": True, "bucket_step": 16, **data},
        }
    )


@pytest.mark.parametrize(
    ("fmt", "data"),
    [
        ("captions", {"flip_p": 0.5, "trigger_word": "sks"}),
        (
            "kohya",
            {"shuffle_tags": True, "keep_tokens": 1, "caption_dropout": 0.2, "crop": "random"},
        ),
        ("imagefolder", {"require_captions": True, "flip_p": 0.5}),
    ],
)
def test_image_format_trains_a_tiny_unet(
    tmp_path: Path, tiny_image_model: Path, fmt: str, data: dict
) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.set_num_threads(2)
    root = _write_images(tmp_path / "data", fmt)
    spec = _image_spec(format=fmt, **data)
    ds = build_image_dataset(root, spec)
    assert len(set(ds.record_buckets)) == 3  # square, landscape, portrait

    load = dict(local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(tiny_image_model, subfolder="unet", **load)
    vae = AutoencoderKL.from_pretrained(tiny_image_model, subfolder="vae", **load)
    te = CLIPTextModel.from_pretrained(tiny_image_model, subfolder="text_encoder", **load)
    tok = CLIPTokenizer.from_pretrained(tiny_image_model, subfolder="tokenizer", **load)
    sched = DDPMScheduler.from_pretrained(tiny_image_model, subfolder="scheduler", **load)
    for m in (unet, vae, te):
        m.requires_grad_(False)
    torch.manual_seed(0)
    unet.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, target_modules=spec.target_modules(), init_lora_weights="gaussian"
        )
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.training.learning_rate)

    plan = cache_plan(spec)
    cache = LatentCache(tmp_path / "cache", cache_key(spec, dataset_digest(ds), "tiny-vae"))

    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor

    @torch.no_grad()
    def embed(captions: tuple[str, ...]) -> torch.Tensor:
        ids = tok(
            list(captions),
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return te(ids)[0]

    gen = torch.Generator().manual_seed(0)
    for step in range(2 * ds.steps_per_epoch):
        if plan.latents:  # the cached path: latents computed once per (record, flip)
            b = ds.plan(step)
            z = []
            for rec, flip in zip(b.records, b.flipped):
                hit = cache.get(rec, flip)
                if hit is None:
                    hit = {"latents": encode(ds.load(rec, flip)[None])[0]}
                    cache.put(rec, flip, hit)
                z.append(hit["latents"])
            latents = torch.stack(z)
        else:
            b = ds.batch(step)
            latents = encode(b.pixels)
        h, w = b.target_size
        assert latents.shape == (2, 4, h // 2, w // 2)  # one bucket per batch
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (2,), generator=gen)
        pred = unet(sched.add_noise(latents, noise, t), t, embed(b.captions)).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert torch.isfinite(loss)
    if plan.latents:  # every record was seen, so every record has at least one cached variant
        cached = {p.name[:6] for p in cache.dir.glob("*.safetensors")}
        assert cached == {f"{r:06d}" for r in range(len(ds.records))}
