"""Work done once: when VAE latents and caption embeddings may be cached, under which key, where.

Integration contract (image trainer):

    plan = cache_plan(spec)          # CachePlan(latents, text, flips)
    cacheable(spec)                  # plan.latents and plan.text: the whole step can be cached
    digest = dataset_digest(ds)      # ImageTrainSet → sha256 of image bytes + raw captions
    key = cache_key(spec, digest, encoder_id)   # encoder_id: e.g. the base model's digest
    cache = LatentCache(cache_root, key)        # node-local: <cache_root>/<key>/
    cache.download(storage)          # from <bucket>/cache/latents/<key>/ when present
    cache.get(record, flipped) / cache.put(record, flipped, {"latents": z, "text": emb, ...})
    cache.upload(storage)            # after the first job encodes, for the next job on this data

Latents vary per step (so are not cacheable) with `data.crop: random`; caption embeddings vary
with caption dropout, tag shuffling, or when the text encoder trains
(`training.train_text_encoder`). Flipping is cacheable: both variants are stored
(`CachePlan.flips`), and the batch's `flipped` says which to read. SDXL's size and crop
conditioning is not cached: it is recomputed from the plan, the same for a cached (centre-crop)
latent as for a fresh one. The encoder id a trainer passes names the VAE weights and dtype.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lorajobs.jobspecs.models import ImageJobSpec
from lorajobs.worker.trainers.image.captions import captions_vary

if TYPE_CHECKING:
    from lorajobs.storage.base import Storage
    from lorajobs.worker.context import WorkerContext
    from lorajobs.worker.trainers.image.data import ImageTrainSet
    from lorajobs.worker.trainers.image.models import Conditioning, Encoders

CACHE_VERSION = 1
BUCKET_PREFIX = "cache/latents"


@dataclass(frozen=True)
class CachePlan:
    """What an image job may compute once instead of every step."""

    latents: bool  # VAE latents per (record, flip)
    text: bool  # text-encoder outputs per record
    flips: tuple[bool, ...]  # the flip variants to cache per record


def cache_plan(spec: ImageJobSpec) -> CachePlan:
    """Which encodings of `spec`'s dataset never change between steps."""
    data = spec.data
    flips = (False,) if data.flip_p <= 0 else (True,) if data.flip_p >= 1 else (False, True)
    return CachePlan(
        latents=data.crop == "center",
        text=not captions_vary(data) and not spec.training.train_text_encoder,
        flips=flips,
    )


def cacheable(spec: ImageJobSpec) -> bool:
    """True when both latents and caption embeddings can be computed once per item."""
    plan = cache_plan(spec)
    return plan.latents and plan.text


def dataset_digest(ds: ImageTrainSet) -> str:
    """sha256 over each image's relative order, bytes and raw caption (repeats excluded)."""
    h = hashlib.sha256()
    for record in ds.records:
        h.update(hashlib.sha256(record.path.read_bytes()).digest())
        h.update(hashlib.sha256(record.caption.encode("utf-8")).digest())
    return h.hexdigest()


def cache_key(spec: ImageJobSpec, digest: str, encoder_id: str) -> str:
    """The cache folder name: dataset + encoders + everything that shapes an encoding."""
    data = spec.data
    parts = {
        "v": CACHE_VERSION,
        "dataset": digest,
        "encoder": encoder_id,
        "resolution": spec.training.resolution,
        "bucketing": data.bucketing,
        "min_resolution": data.min_resolution,
        "max_resolution": data.max_resolution,
        "bucket_step": data.bucket_step,
        "crop": data.crop,
        "trigger_word": data.trigger_word,
    }
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


class LatentCache:
    """Per-item tensors as safetensors files under `<root>/<key>/` (never pickle)."""

    def __init__(self, root: Path, key: str) -> None:
        self.key = key
        self.dir = Path(root) / key

    def path(self, record: int, flipped: bool = False) -> Path:
        return self.dir / f"{record:06d}{'-flip' if flipped else ''}.safetensors"

    def get(self, record: int, flipped: bool = False) -> dict[str, torch.Tensor] | None:
        """The tensors stored for (record, flipped), or None."""
        from safetensors.torch import load_file

        path = self.path(record, flipped)
        if not path.is_file():
            return None
        return load_file(str(path))

    def put(self, record: int, flipped: bool, tensors: dict[str, torch.Tensor]) -> None:
        """Store (atomically: write to a temp name, then rename)."""
        from lorajobs.worker.safetensors_io import save_canonical

        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
        os.close(fd)
        try:
            save_canonical(
                {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, Path(tmp)
            )
            os.replace(tmp, self.path(record, flipped))
        finally:
            Path(tmp).unlink(missing_ok=True)

    def complete(self, records: int, flips: tuple[bool, ...]) -> bool:
        """Whether every record has every flip variant stored."""
        return all(self.path(r, f).is_file() for r in range(records) for f in flips)

    def upload(self, storage: Storage, prefix: str = BUCKET_PREFIX) -> int:
        """Copy every stored file to `<storage>/<prefix>/<key>/`; returns files uploaded."""
        n = 0
        for path in sorted(self.dir.glob("*.safetensors")):
            key = f"{prefix}/{self.key}/{path.name}"
            if not storage.exists(key):
                storage.put_file(path, key)
                n += 1
        return n

    def download(self, storage: Storage, prefix: str = BUCKET_PREFIX) -> int:
        """Fetch what the bucket holds under `<prefix>/<key>/`; returns files fetched."""
        n = 0
        base = f"{prefix}/{self.key}/"
        for info in storage.list(base):
            name = info.key.rsplit("/", 1)[-1]
            if not name.endswith(".safetensors") or (self.dir / name).is_file():
                continue
            self.dir.mkdir(parents=True, exist_ok=True)
            storage.get_file(info.key, self.dir / name)
            n += 1
        return n


def encode_latents(
    ds: ImageTrainSet,
    plan: CachePlan,
    encoder: Encoders,
    spec: ImageJobSpec,
    model_dir: Path,
    ctx: WorkerContext,
) -> dict[tuple[int, bool], torch.Tensor]:
    """Latents of every (image, flip), encoded once per dataset + VAE: from the node cache,
    else the bucket's (`<bucket>/cache/latents/<key>/`), else encoded here and shared."""
    from lorajobs.worker.sidecar import hash_cache_for, tree_digest

    # The VAE's weights and the dtype it runs in (bf16 latents are not fp32 latents).
    # The digest reuses the node's hash cache, as the sidecar's does: no re-read per job.
    vae_dir = model_dir / "vae"
    vae_digest = tree_digest(vae_dir, hash_cache=hash_cache_for(ctx.cache_dir, vae_dir))
    vae_id = f"{vae_digest}:{str(encoder.vae.dtype).removeprefix('torch.')}"
    key = cache_key(spec, dataset_digest(ds), vae_id)
    cache = LatentCache(ctx.cache_dir / "latents", key)
    storage = None
    if ctx.latent_cache_uri:
        from lorajobs.storage.backends import open_storage

        storage = open_storage(ctx.latent_cache_uri)
        if not cache.complete(len(ds.records), plan.flips):
            cache.download(storage)
    out: dict[tuple[int, bool], torch.Tensor] = {}
    encoded = 0
    for record in range(len(ds.records)):
        for flipped in plan.flips:
            stored = cache.get(record, flipped)
            if stored is None or "latents" not in stored:
                z = encoder.latents(ds.load(record, flipped).unsqueeze(0))[0]
                cache.put(record, flipped, {"latents": z})
                encoded += 1
            else:
                z = stored["latents"]
            out[record, flipped] = z
    if storage is not None and encoded:
        cache.upload(storage)
    return out


def encode_captions(
    ds: ImageTrainSet, spec: ImageJobSpec, encoder: Encoders
) -> dict[str, Conditioning]:
    """Embeddings of every caption the job will use, when captions do not vary per step (so
    each image's caption, trigger word included, is the same in every epoch)."""
    from lorajobs.worker.trainers.image.captions import caption_for

    first_item: dict[int, int] = {}
    for item, record in enumerate(ds.items):
        first_item.setdefault(record, item)
    captions = sorted(
        {
            caption_for(ds.records[r].caption, spec.data, spec.training.seed, 0, item)
            for r, item in first_item.items()
        }
    )
    return {c: encoder.captions([c])[0] for c in captions}
