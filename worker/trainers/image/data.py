"""The image training set: records → buckets → per-step batches of pixels and captions.

Integration contract (what the image trainer calls):

    ds = build_image_dataset(data_dir, spec)     # ImageJobSpec; UserDataError on bad data
    len(ds.records)                               # distinct images (ss_num_train_images)
    len(ds)                                       # items per epoch (images × kohya repeats)
    ds.steps_per_epoch                            # batches per epoch (epochs → steps)
    batch = ds.batch(step)                        # 0-based step → ImageBatch, pixels loaded
    plan = ds.plan(step)                          # the same without decoding (pixels is None)
    ds.load(record, flipped)                      # deterministic pixels for latent caching
                                                  # (centre crop only: see cache_plan)
    ds.size_conditioning(plan)                    # SDXL time ids per item (flip-aware crop)

An `ImageBatch` holds `pixels` (B, 3, H, W) float32 in [-1, 1], `captions` (final text: trigger,
shuffle and dropout applied), and per item `records`, `flipped`, `original_sizes` (h, w) and
`crops_top_left` (top, left) for SDXL size/crop conditioning, plus `target_size` (h, w) — every
item of a batch shares one bucket. Everything random (order, flip, crop, caption options) is a
pure function of (training.seed, epoch, item), so `batch(step)` needs no replay on resume.

With `data.bucketing` off there is one square bucket of `training.resolution` and centre crops:
the pixels are exactly those of `ImageCaptionDataset`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from lorajobs.jobspecs.models import ImageData, ImageJobSpec
from lorajobs.worker.trainers.image.buckets import (
    Bucket,
    BucketBatchSampler,
    closest_bucket,
    default_bucket_range,
    make_buckets,
)
from lorajobs.worker.trainers.image.captions import caption_for, sample_rng
from lorajobs.worker.trainers.image.pixels import (
    cover_size,
    image_size,
    open_rgb,
    resize_and_crop,
    to_tensor,
)
from lorajobs.worker.trainers.image.sources import ImageRecord, read_image_records


@dataclass(frozen=True)
class ImageBatch:
    """One step's batch; all items share one bucket (`target_size`)."""

    epoch: int
    bucket: int
    target_size: tuple[int, int]  # (height, width) in pixels
    items: tuple[int, ...]  # positions in the epoch's item list (repeats expanded)
    records: tuple[int, ...]  # index into ImageTrainSet.records, per item
    captions: tuple[str, ...]
    flipped: tuple[bool, ...]
    original_sizes: tuple[tuple[int, int], ...]  # (height, width) of each source image
    crops_top_left: tuple[tuple[int, int], ...]  # (top, left) in the resized image
    pixels: torch.Tensor | None = None  # (B, 3, H, W) float32 in [-1, 1]; None from plan()


class ImageTrainSet:
    """Bucketed, captioned images with a step-addressable batch order."""

    def __init__(
        self,
        records: list[ImageRecord],
        data: ImageData,
        *,
        resolution: int,
        batch_size: int,
        seed: int,
    ) -> None:
        self.records = records
        self.data = data
        self.seed = seed
        self.resolution = resolution
        self.sizes = [image_size(r.path) for r in records]  # (w, h); checks decodability
        if data.bucketing:
            lo, hi = default_bucket_range(resolution, data.bucket_step)
            self.buckets: list[Bucket] = make_buckets(
                resolution,
                data.min_resolution or lo,
                data.max_resolution or hi,
                data.bucket_step,
            )
        else:
            self.buckets = [(resolution, resolution)]
        self.record_buckets = [closest_bucket(w, h, self.buckets) for w, h in self.sizes]
        # Items: each record once per repeat, in record order.
        self.items = [i for i, r in enumerate(records) for _ in range(r.repeats)]
        self.sampler = BucketBatchSampler(
            [self.record_buckets[i] for i in self.items], batch_size, seed
        )

    def __len__(self) -> int:
        return len(self.items)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def bucket_counts(self) -> dict[Bucket, int]:
        """Images per bucket (for logs and metadata)."""
        out: dict[Bucket, int] = {}
        for b in self.record_buckets:
            out[self.buckets[b]] = out.get(self.buckets[b], 0) + 1
        return out

    def plan(self, step: int) -> ImageBatch:
        """What 0-based `step` trains on, without decoding any image."""
        planned = self.sampler.batch(step)
        width, height = self.buckets[planned.bucket]
        records, captions, flips, sizes, crops = [], [], [], [], []
        for item in planned.items:
            rec = self.items[item]
            records.append(rec)
            captions.append(
                caption_for(self.records[rec].caption, self.data, self.seed, planned.epoch, item)
            )
            flips.append(self._flip(planned.epoch, item))
            w, h = self.sizes[rec]
            sizes.append((h, w))
            crops.append(self._crop(planned.epoch, item, (w, h), (width, height)))
        return ImageBatch(
            epoch=planned.epoch,
            bucket=planned.bucket,
            target_size=(height, width),
            items=planned.items,
            records=tuple(records),
            captions=tuple(captions),
            flipped=tuple(flips),
            original_sizes=tuple(sizes),
            crops_top_left=tuple(crops),
        )

    def batch(self, step: int) -> ImageBatch:
        """The batch of 0-based `step`, pixels decoded, resized, cropped and flipped."""
        plan = self.plan(step)
        height, width = plan.target_size
        pixels = [
            self._pixels(rec, width, height, crop, flip)
            for rec, crop, flip in zip(plan.records, plan.crops_top_left, plan.flipped)
        ]
        return replace(plan, pixels=torch.stack(pixels))

    def load(self, record: int, flipped: bool = False) -> torch.Tensor:
        """Pixels of `record` in its bucket with a centre crop: what a latent cache stores."""
        width, height = self.buckets[self.record_buckets[record]]
        return self._pixels(record, width, height, None, flipped)

    def _pixels(
        self, record: int, width: int, height: int, crop: tuple[int, int] | None, flip: bool
    ) -> torch.Tensor:
        img, _ = resize_and_crop(open_rgb(self.records[record].path), width, height, crop)
        pixels = to_tensor(img)
        return pixels.flip(-1) if flip else pixels

    def _flip(self, epoch: int, item: int) -> bool:
        p = self.data.flip_p
        if p <= 0:
            return False
        return p >= 1 or sample_rng("flip", self.seed, epoch, item).random() < p

    def size_conditioning(self, plan: ImageBatch) -> list[tuple[int, int, int, int, int, int]]:
        """SDXL's size and crop conditioning per item of `plan`: (original height, width, crop
        top, crop left, target height, width).

        The crop is where the training image starts in the resized source *as the model sees
        it*: for a flipped item, the left edge of the crop in the flipped image (as kohya's
        sd-scripts and diffusers' SDXL script, which flip before cropping, both give it).
        """
        th, tw = plan.target_size
        out = []
        for (h, w), (top, left), flip in zip(
            plan.original_sizes, plan.crops_top_left, plan.flipped
        ):
            if flip:
                rw, _ = cover_size(w, h, tw, th)
                left = rw - tw - left
            out.append((h, w, top, left, th, tw))
        return out

    def _crop(
        self, epoch: int, item: int, size: tuple[int, int], bucket: Bucket
    ) -> tuple[int, int]:
        """(top, left) of the crop in the resized image."""
        bw, bh = bucket
        rw, rh = cover_size(*size, bw, bh)
        if self.data.crop == "center":
            return (rh - bh) // 2, (rw - bw) // 2
        rng = sample_rng("crop", self.seed, epoch, item)
        return rng.randint(0, rh - bh), rng.randint(0, rw - bw)


def build_image_dataset(data_dir: Path, spec: ImageJobSpec) -> ImageTrainSet:
    """Read, check and bucket the dataset of an image job; `UserDataError` on bad data."""
    records = read_image_records(Path(data_dir), spec.data)
    return ImageTrainSet(
        records,
        spec.data,
        resolution=spec.training.resolution,
        batch_size=spec.training.batch_size,
        seed=spec.training.seed,
    )
