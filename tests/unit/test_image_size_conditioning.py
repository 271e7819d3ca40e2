"""SDXL's size and crop conditioning from the dataset: original size, where the crop starts in
the image the model sees (flips included), and the target size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from lorajobs.jobspecs.models import ImageJobSpec
from lorajobs.worker.trainers.image.data import build_image_dataset
from lorajobs.worker.trainers.image.pixels import cover_size, open_rgb, to_tensor


def _spec(**data: object) -> ImageJobSpec:
    return ImageJobSpec.model_validate(
        {
            "kind": "image",
            "name": "t",
            "base_model": "b",
            "dataset": "d",
            "training": {"steps": 4, "batch_size": 2, "resolution": 64, "seed": 3},
            "data": data,
        }
    )


def _noise_images(root: Path, sizes: list[tuple[int, int]]) -> Path:
    """Random pixels: any wrong crop or flip shows in the comparison."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def test_unflipped_items_condition_on_the_crop_and_sizes(tmp_path: Path) -> None:
    # 100x64 (w x h) into the single 64x64 bucket: no resize needed in height, a centre crop
    # 18 px from the left; 64x80 is cropped 8 px from the top.
    root = _noise_images(tmp_path / "d", [(100, 64), (64, 80)])
    ds = build_image_dataset(root, _spec())
    plan = ds.plan(0)
    by_record = dict(zip(plan.records, ds.size_conditioning(plan)))
    assert by_record == {0: (64, 100, 0, 18, 64, 64), 1: (80, 64, 8, 0, 64, 64)}


def test_flipped_items_give_the_crop_in_the_flipped_image(tmp_path: Path) -> None:
    """With random crops and flips, the conditioning's (top, left) is where the batch's pixels
    sit in the resized, mirrored source: what diffusers' SDXL script (flip, then crop) and
    kohya's sd-scripts pass."""
    sizes = [(150, 64), (64, 100), (96, 80), (64, 64)]
    root = _noise_images(tmp_path / "d", sizes)
    ds = build_image_dataset(root, _spec(bucketing=True, bucket_step=16, flip_p=0.5, crop="random"))
    seen_flip = seen_plain = asymmetric = 0
    for step in range(3 * ds.steps_per_epoch):
        batch = ds.batch(step)
        th, tw = batch.target_size
        for i, (record, flip) in enumerate(zip(batch.records, batch.flipped)):
            oh, ow, top, left, h, w = ds.size_conditioning(batch)[i]
            assert (h, w) == (th, tw)
            assert (ow, oh) == sizes[record]
            source = open_rgb(root / f"{record}.png")
            resized = source.resize(cover_size(ow, oh, tw, th), Image.Resampling.BICUBIC)
            seen = ImageOps.mirror(resized) if flip else resized
            expected = to_tensor(seen.crop((left, top, left + tw, top + th)))
            assert np.array_equal(batch.pixels[i].numpy(), expected.numpy()), (step, i)
            seen_flip += flip
            seen_plain += not flip
            asymmetric += flip and left != batch.crops_top_left[i][1]
    assert seen_flip and seen_plain and asymmetric  # both cases met, and the flip mattered
