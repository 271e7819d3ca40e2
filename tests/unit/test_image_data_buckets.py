"""Buckets, the one-bucket-per-batch sampler, caption options, flip/crop, and latent caching."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from lorajobs.jobspecs.models import ImageData, ImageJobSpec
from lorajobs.storage.files import FileStorage
from lorajobs.worker.trainers.image.buckets import BucketBatchSampler, closest_bucket, make_buckets
from lorajobs.worker.trainers.image.captions import caption_for
from lorajobs.worker.trainers.image.data import build_image_dataset
from lorajobs.worker.trainers.image.latents import (
    LatentCache,
    cache_key,
    cache_plan,
    cacheable,
    dataset_digest,
)
from lorajobs.worker.trainers.image.pixels import ImageCaptionDataset


def _spec(**data) -> ImageJobSpec:
    training = {"steps": 4, "batch_size": 2, "resolution": 64, "seed": 3}
    training.update(data.pop("training", {}))
    return ImageJobSpec.model_validate(
        {
            "kind": "image",
            "name": "t",
            "base_model": "b",
            "dataset": "d",
            "training": training,
            "data": data,
        }
    )


def _images(root: Path, sizes: list[tuple[int, int]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        # A left-to-right ramp so flips and crops are visible in the pixels.
        img = Image.linear_gradient("L").resize((w, h)).rotate(90, expand=False).convert("RGB")
        img.save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"img{i}, red, round, big", encoding="utf-8")
    return root


def test_buckets_are_multiples_with_area_near_resolution_squared() -> None:
    buckets = make_buckets(512, 256, 1024, 64)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h) and max(w, h) <= 1024
        assert 512 * 512 - 64 * max(w, h) < w * h <= 512 * 512


def test_each_image_goes_to_the_closest_aspect_bucket() -> None:
    buckets = make_buckets(512, 256, 1024, 64)
    assert buckets[closest_bucket(1000, 1000, buckets)] == (512, 512)
    w, h = buckets[closest_bucket(1920, 1080, buckets)]
    assert w > h and abs(math.log(w / h) - math.log(16 / 9)) < 0.15
    w, h = buckets[closest_bucket(1080, 1920, buckets)]
    assert h > w


def test_sampler_batches_come_from_one_bucket_and_cover_every_item() -> None:
    item_buckets = [0, 0, 0, 1, 1, 2, 0, 1, 2, 2, 2]
    sampler = BucketBatchSampler(item_buckets, batch_size=3, seed=5)
    for epoch in range(3):
        batches = sampler.epoch(epoch)
        assert len(batches) == sampler.batches_per_epoch == 2 + 1 + 2
        seen = set()
        for b in batches:
            assert len(b.items) == 3 and {item_buckets[i] for i in b.items} == {b.bucket}
            seen.update(b.items)
        assert seen == set(range(len(item_buckets)))


def test_sampler_order_is_a_pure_function_of_seed_and_epoch() -> None:
    item_buckets = [i % 3 for i in range(20)]
    a = BucketBatchSampler(item_buckets, 4, seed=1)
    stream = [a.batch(s) for s in range(30)]
    fresh = BucketBatchSampler(item_buckets, 4, seed=1)
    assert fresh.batch(17) == stream[17]  # positioned by the step alone, no replay
    assert [b.items for b in a.epoch(0)] != [b.items for b in a.epoch(1)]
    other = BucketBatchSampler(item_buckets, 4, seed=2)
    assert [other.batch(s) for s in range(30)] != stream


def test_dataset_batches_have_one_shape_and_are_deterministic(tmp_path: Path) -> None:
    root = _images(tmp_path / "d", [(64, 64), (128, 64), (64, 128), (96, 64), (60, 64), (64, 30)])
    spec = _spec(bucketing=True, bucket_step=16, flip_p=0.5, crop="random")
    ds = build_image_dataset(root, spec)
    again = build_image_dataset(root, spec)
    for step in range(2 * ds.steps_per_epoch):
        b = ds.batch(step)
        h, w = b.target_size
        assert b.pixels.shape == (2, 3, h, w) and (w, h) == ds.buckets[b.bucket]
        assert torch.equal(b.pixels, again.batch(step).pixels)
        assert b.original_sizes == tuple((ds.sizes[r][1], ds.sizes[r][0]) for r in b.records)
    wide = ds.buckets[ds.record_buckets[1]]
    assert wide[0] > wide[1]  # the 2:1 image is in a landscape bucket


def test_without_bucketing_pixels_equal_the_square_reader(tmp_path: Path) -> None:
    root = _images(tmp_path / "d", [(64, 48), (40, 64), (64, 64)])
    ds = build_image_dataset(root, _spec())
    assert ds.buckets == [(64, 64)]
    old = ImageCaptionDataset(root, 64)
    for r in range(3):
        assert torch.equal(ds.load(r), old[r].pixels)


def test_flip_mirrors_the_image(tmp_path: Path) -> None:
    root = _images(tmp_path / "d", [(64, 64)])
    ds = build_image_dataset(root, _spec(flip_p=1.0))
    b = ds.batch(0)
    assert b.flipped == (True, True)
    assert torch.equal(b.pixels[0], ds.load(0).flip(-1))
    assert not torch.equal(b.pixels[0], ds.load(0))  # the ramp really is mirrored


def test_kohya_repeats_multiply_items(tmp_path: Path) -> None:
    _images(tmp_path / "3_thing", [(64, 64), (64, 64)])
    ds = build_image_dataset(tmp_path, _spec())
    assert len(ds.records) == 2 and len(ds) == 6 and ds.steps_per_epoch == 3


def test_caption_options() -> None:
    data = ImageData(trigger_word="sks", shuffle_tags=True, keep_tokens=1)
    caps = {caption_for("a, b, c, d, e", data, 0, epoch, 0) for epoch in range(20)}
    assert all(c.startswith("sks, a, ") for c in caps)  # trigger first, first tag kept
    assert all(sorted(c.split(", ")[2:]) == ["b", "c", "d", "e"] for c in caps)
    assert len(caps) > 5  # shuffled differently across epochs
    assert caption_for("a, b, c", data, 0, 4, 9) == caption_for("a, b, c", data, 0, 4, 9)
    assert caption_for("x", ImageData(trigger_word="sks"), 0, 0, 0) == "sks, x"
    assert caption_for("", ImageData(trigger_word="sks"), 0, 0, 0) == "sks"


def test_caption_dropout_rate_is_seeded() -> None:
    data = ImageData(caption_dropout=0.3)
    empties = [caption_for("x", data, 1, e, i) == "" for e in range(10) for i in range(100)]
    assert 0.25 < sum(empties) / len(empties) < 0.35
    assert empties == [caption_for("x", data, 1, e, i) == "" for e in range(10) for i in range(100)]


@pytest.mark.parametrize(
    ("data", "latents", "text", "whole"),
    [
        ({}, True, True, True),
        ({"flip_p": 0.5}, True, True, True),
        ({"caption_dropout": 0.1}, True, False, False),
        ({"shuffle_tags": True}, True, False, False),
        ({"crop": "random"}, False, True, False),
    ],
)
def test_cache_plan(data: dict, latents: bool, text: bool, whole: bool) -> None:
    spec = _spec(**data)
    plan = cache_plan(spec)
    assert (plan.latents, plan.text, cacheable(spec)) == (latents, text, whole)
    assert plan.flips == ((False, True) if data.get("flip_p") else (False,))


def test_cache_key_and_latent_cache_round_trip(tmp_path: Path) -> None:
    root = _images(tmp_path / "d", [(64, 64), (64, 64)])
    spec = _spec(flip_p=0.5)
    ds = build_image_dataset(root, spec)
    digest = dataset_digest(ds)
    key = cache_key(spec, digest, "enc-1")
    assert key == cache_key(_spec(flip_p=0.5), digest, "enc-1")
    assert key != cache_key(spec, digest, "enc-2")
    assert key != cache_key(_spec(training={"resolution": 128}), digest, "enc-1")
    (root / "00.txt").write_text("changed", encoding="utf-8")
    assert dataset_digest(build_image_dataset(root, spec)) != digest

    cache = LatentCache(tmp_path / "node", key)
    assert cache.get(0) is None and not cache.complete(2, (False, True))
    for r in range(2):
        for flip in (False, True):
            cache.put(r, flip, {"latents": torch.full((4, 8, 8), r + flip * 10.0)})
    assert cache.complete(2, (False, True))
    assert torch.equal(cache.get(1, True)["latents"], torch.full((4, 8, 8), 11.0))

    bucket = FileStorage(tmp_path / "bucket")
    assert cache.upload(bucket) == 4 and cache.upload(bucket) == 0
    assert bucket.exists(f"cache/latents/{key}/000001-flip.safetensors")
    other = LatentCache(tmp_path / "other-node", key)
    assert other.download(bucket) == 4
    assert torch.equal(other.get(0, False)["latents"], cache.get(0, False)["latents"])
