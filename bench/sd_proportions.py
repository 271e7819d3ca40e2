"""A bench-only image model with Stable Diffusion 1.5's structure and cost proportions.

What latent caching saves is the VAE encode (and the text encode) of every step, so how much it
saves depends on what encoding costs next to a UNet training step. For SD 1.5 at 512 px, counted
with `torch.utils.flop_counter` on the real configs (`python bench/sd_proportions.py` prints it):

    per image: VAE encode 1.12 TFLOP (34 M parameters, but at full resolution: 512² x 128 ch)
               UNet forward 0.80 + backward 0.91 TFLOP (860 M parameters at 64² latents,
               LoRA r=4 on the attention projections: the backward has no frozen-weight grads)
               CLIP-L text encoder 0.013 TFLOP
    → encoding is ~39 % of a step that encodes (encode / train ≈ 0.65): caching brings a step
      to ~0.61x at best, where GPU time follows the FLOPs (large convolutions and matmuls).

The test suite's tiny model (worker/trainers/image/tiny.py: 64 px, 2-level VAE and UNet) is built for
fast tests, and on a CPU its encode is ~22 % of a bare step: caching cannot show there what it
does for SD. This model keeps SD's structure — an 8x VAE with 4 levels and 2 ResNets per level,
a 4-level UNet with cross-attention at the 3 upper levels and 2 layers per block, SD's channel
ratios within each — at 128 px (16² latents: 1/16 of SD's positions), and its widths are set so
that the *measured CPU time* of an encode vs a LoRA step matches SD's FLOP ratio: UNet widths
SD/8 (40, 80, 160, 160), VAE widths 7/32 of SD's (28, 56, 112, 112; 4 channels per norm group,
as SD's); the encode measures ~0.37-0.40 of a bare step here. Equal width scales would keep the
FLOP ratio, but a CPU runs the UNet's many small ops (attention, norms, LoRA, backward) at about
a quarter of the FLOP rate of the VAE's few large convolutions: at SD/8 for both, the encode is
~0.2 of a step, and the bench would understate what caching saves on a GPU. The bench prints the
share it measured in the bare loop (`baseline_encode_share`), so a reader sees the proportion
each result rests on. The tokenizer, text encoder and scheduler are the tiny model's (a text
encoder is ~1 % of an SD step, as here).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

# SD 1.5's published configs (runwayml/stable-diffusion-v1-5), the parts that set the cost.
SD15_VAE = {"block_out_channels": (128, 256, 512, 512), "norm_num_groups": 32, "sample_size": 512}
SD15_UNET = {
    "block_out_channels": (320, 640, 1280, 1280),
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
    "sample_size": 64,
}
BENCH_VAE = {"block_out_channels": (28, 56, 112, 112), "norm_num_groups": 7, "sample_size": 128}
BENCH_UNET = {"block_out_channels": (40, 80, 160, 160), "norm_num_groups": 8, "sample_size": 16}
BENCH_RESOLUTION = 128


def _vae(**over: Any) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.18215,
        **over,
    )


def _unet(**over: Any) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        **over,
    )


def build_sd_proportioned_model(out: Path, *, seed: int = 0) -> Path:
    """The tiny pipeline folder with its UNet and VAE replaced by the SD-proportioned ones."""
    import torch

    from lorajobs.worker.trainers.image.tiny import build_tiny_image_model

    build_tiny_image_model(out, seed=seed)
    cross = json.loads((out / "text_encoder" / "config.json").read_text())["hidden_size"]
    torch.manual_seed(seed)
    unet = _unet(cross_attention_dim=cross, **BENCH_UNET)
    torch.manual_seed(seed + 1)
    vae = _vae(**BENCH_VAE)
    for name, module in (("unet", unet), ("vae", vae)):
        shutil.rmtree(out / name)
        module.save_pretrained(out / name)
    return out


def flop_shares(vae: Any, unet: Any, resolution: int, cross: int, device: str) -> dict[str, float]:
    """FLOPs per image of a VAE encode, and of a UNet forward and backward with LoRA r=4."""
    import torch
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    vae.requires_grad_(False)
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=8,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_out.0", "to_q", "to_v"],
        )
    )
    pixels = torch.randn(1, 3, resolution, resolution, device=device)
    context = torch.randn(1, 77, cross, device=device)
    with FlopCounterMode(display=False) as f, torch.no_grad():
        z = vae.encode(pixels).latent_dist.mean
    encode = f.get_total_flops()
    with FlopCounterMode(display=False) as f:
        pred = unet(z, torch.tensor([10], device=device), encoder_hidden_states=context).sample
    forward = f.get_total_flops()
    with FlopCounterMode(display=False) as f:
        pred.float().square().mean().backward()
    backward = f.get_total_flops()
    return {
        "encode": encode,
        "forward": forward,
        "backward": backward,
        "encode_over_train": encode / (forward + backward),
        "encode_share": encode / (encode + forward + backward),
    }


def main() -> None:
    """Print the FLOP shares of SD 1.5 at 512 px (meta tensors: nothing is allocated) and of
    the bench model, and the bench model's measured CPU times."""
    import statistics
    import time

    import torch

    with torch.device("meta"):
        sd = flop_shares(_vae(**SD15_VAE), _unet(**SD15_UNET), 512, 768, "meta")
    print(
        "SD 1.5, 512 px, per image: "
        + ", ".join(
            f"{k} {v / 1e12:.3f} TFLOP" if v > 10 else f"{k} {v:.2f}" for k, v in sd.items()
        )
    )
    torch.manual_seed(0)
    vae, unet = _vae(**BENCH_VAE), _unet(cross_attention_dim=32, **BENCH_UNET)
    bench = flop_shares(vae, unet, BENCH_RESOLUTION, 32, "cpu")
    print(
        f"bench model, {BENCH_RESOLUTION} px, per image: "
        + ", ".join(
            f"{k} {v / 1e9:.2f} GFLOP" if v > 10 else f"{k} {v:.2f}" for k, v in bench.items()
        )
    )

    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    torch.set_num_threads(threads)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    pixels = torch.randn(2, 3, BENCH_RESOLUTION, BENCH_RESOLUTION)
    context = torch.randn(2, 77, 32)

    def encode() -> torch.Tensor:
        with torch.no_grad():
            return vae.encode(pixels).latent_dist.mean

    def step() -> None:
        noise = torch.randn_like(z)
        pred = unet(z + noise, torch.tensor([10, 500]), encoder_hidden_states=context).sample
        torch.nn.functional.mse_loss(pred, noise).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def cpu_ms(fn: Any) -> float:
        fn()
        times = []
        for _ in range(8):
            t = time.process_time()
            fn()
            times.append(time.process_time() - t)
        return statistics.median(times) * 1e3

    z = encode()
    e, s = cpu_ms(encode), cpu_ms(step)
    print(
        f"bench model, batch 2, {threads} thread(s), CPU time: encode {e:.1f} ms, LoRA step "
        f"{s:.1f} ms; encode / train {e / s:.2f}, encode share {e / (e + s):.2f}"
    )


if __name__ == "__main__":
    main()
