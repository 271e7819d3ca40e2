"""Per-sample caption options: tag shuffling, a trigger word, caption dropout.

Each is a pure function of (seed, epoch, item index), so a resumed run sees the same captions,
and each option draws from its own seeded stream so turning one on never changes another.
"""

from __future__ import annotations

import random

from lorajobs.jobspecs.models import ImageData


def sample_rng(kind: str, seed: int, epoch: int, index: int) -> random.Random:
    """A generator for one per-sample decision; `kind` separates the streams."""
    # String seeds go through SHA-512: stable across processes and Python hash seeds.
    return random.Random(f"lorajobs-{kind}:{seed}:{epoch}:{index}")


def shuffle_tags(caption: str, keep: int, rng: random.Random) -> str:
    """Shuffle the comma-separated tags of `caption`, the first `keep` staying in place."""
    tags = [t.strip() for t in caption.split(",")]
    tags = [t for t in tags if t]
    head, tail = tags[:keep], tags[keep:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


def with_trigger(caption: str, trigger: str | None) -> str:
    """`trigger, caption` (or the trigger alone), unless the caption already starts with it."""
    if not trigger:
        return caption
    if not caption:
        return trigger
    if caption == trigger or caption.startswith(trigger + ","):
        return caption
    return f"{trigger}, {caption}"


def caption_for(caption: str, data: ImageData, seed: int, epoch: int, index: int) -> str:
    """The caption item `index` trains on in `epoch`.

    Order: shuffle tags (the first `keep_tokens` fixed), then prepend the trigger word (so it is
    always first and never shuffled), then caption dropout (an empty caption, trigger included,
    which trains the unconditional prediction).
    """
    if data.shuffle_tags:
        caption = shuffle_tags(caption, data.keep_tokens, sample_rng("tags", seed, epoch, index))
    caption = with_trigger(caption, data.trigger_word)
    if data.caption_dropout > 0:
        if sample_rng("dropout", seed, epoch, index).random() < data.caption_dropout:
            return ""
    return caption


def captions_vary(data: ImageData) -> bool:
    """Whether a caption can differ between epochs (so its embedding cannot be cached)."""
    return data.caption_dropout > 0 or data.shuffle_tags
