"""Aspect-ratio buckets and a batch sampler whose every batch comes from one bucket.

Buckets are (width, height) pairs, both multiples of `step` between `min_res` and `max_res`,
with area at most (and close to) resolution². An image goes to the bucket whose aspect ratio is
closest to its own (in log space, so 2:1 and 1:2 are equally far from 1:1).

`BucketBatchSampler.batch(step)` is a pure function of (seed, step): the batches of an epoch are
a pure function of (seed, epoch), and every epoch has the same number of batches, so a resumed
run positions its data from the step number alone.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from lorajobs.jobspecs.failures import InvalidInput

Bucket = tuple[int, int]  # (width, height) in pixels


def make_buckets(resolution: int, min_res: int, max_res: int, step: int = 64) -> list[Bucket]:
    """Buckets with sides in [min_res, max_res], multiples of `step`, area ≈ resolution²."""
    if min_res > max_res:
        raise InvalidInput(f"data.min_resolution {min_res} > data.max_resolution {max_res}")
    area = resolution * resolution
    lo = math.ceil(min_res / step) * step
    out: set[Bucket] = set()
    for width in range(lo, max_res + 1, step):
        height = min(max_res, (area // width) // step * step)
        if height >= lo:
            out.add((width, height))
            out.add((height, width))
    if not out:
        raise InvalidInput(
            f"no bucket fits: sides {min_res}..{max_res} in steps of {step} "
            f"around resolution {resolution}"
        )
    return sorted(out, key=lambda b: (b[0] / b[1], b))


def default_bucket_range(resolution: int, step: int) -> tuple[int, int]:
    """(min, max) bucket sides when the spec gives none: resolution/2 .. resolution*2."""
    lo = max(step, (resolution // 2) // step * step)
    return lo, max(lo, resolution * 2 // step * step)


def closest_bucket(width: int, height: int, buckets: list[Bucket]) -> int:
    """Index of the bucket closest in aspect ratio; ties go to the larger area, then the first."""
    aspect = math.log(width / height)
    return min(
        range(len(buckets)),
        key=lambda i: (
            round(abs(math.log(buckets[i][0] / buckets[i][1]) - aspect), 12),
            -buckets[i][0] * buckets[i][1],
            i,
        ),
    )


@dataclass(frozen=True)
class PlannedBatch:
    """What one step trains on: item indices, all from one bucket."""

    epoch: int
    bucket: int
    items: tuple[int, ...]


class BucketBatchSampler:
    """Batches of exactly `batch_size` items, each batch from a single bucket.

    Per epoch: the items of each bucket are shuffled and cut into batches; a bucket's last,
    short batch is filled up from the start of the same bucket's shuffled order (so every item
    is seen at least once per epoch and every batch has the same size); then the batches of all
    buckets are shuffled together. All draws come from `random.Random("…:{seed}:{epoch}")`.
    """

    def __init__(self, item_buckets: list[int], batch_size: int, seed: int) -> None:
        if not item_buckets:
            raise ValueError("no items to sample")
        self.batch_size, self.seed = batch_size, seed
        self.groups: dict[int, list[int]] = {}
        for item, bucket in enumerate(item_buckets):
            self.groups.setdefault(bucket, []).append(item)
        self.batches_per_epoch = sum(math.ceil(len(g) / batch_size) for g in self.groups.values())
        self._cache: tuple[int, list[PlannedBatch]] | None = None

    def epoch(self, epoch: int) -> list[PlannedBatch]:
        """Every batch of `epoch`, in training order."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = random.Random(f"lorajobs-buckets:{self.seed}:{epoch}")
        batches: list[PlannedBatch] = []
        for bucket in sorted(self.groups):
            order = list(self.groups[bucket])
            rng.shuffle(order)
            for start in range(0, len(order), self.batch_size):
                items = [order[(start + k) % len(order)] for k in range(self.batch_size)]
                batches.append(PlannedBatch(epoch, bucket, tuple(items)))
        rng.shuffle(batches)
        self._cache = (epoch, batches)  # one epoch kept: steps run through epochs in order
        return batches

    def batch(self, step: int) -> PlannedBatch:
        """The batch of 0-based `step`."""
        epoch, k = divmod(step, self.batches_per_epoch)
        return self.epoch(epoch)[k]
