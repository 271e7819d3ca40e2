"""A learnable synthetic image set, written in any of the image dataset layouts.

Flat-colour images captioned by their colour: their latents are (nearly) constant per channel,
so the denoising objective of a tiny random UNet depends on little but the noise, and a LoRA
that can reach the UNet's full-resolution path learns it within tens of steps. Used by tests
to show that every layout trains, on the same pixels and captions; deterministic, no RNG.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from lorajobs.worker.trainers.image.sources import METADATA_FILE

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 30),
    "green": (30, 180, 30),
    "blue": (30, 30, 200),
    "yellow": (220, 200, 30),
}
LAYOUTS = ("captions", "kohya", "imagefolder")


def write_colour_set(root: Path, layout: str, *, size: int = 64, repeats: int = 2) -> Path:
    """Write one `size`-pixel flat image per colour under `root` in `layout`; return `root`.

    captions: `img/<i>_<colour>.png` + same-name `.txt`; kohya: the same inside
    `<repeats>_colour/`, every other image left without a `.txt` so it falls back to the
    concept; imagefolder: `img/<i>_<colour>.png` listed in `metadata.jsonl` with `text`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {LAYOUTS}")
    root = Path(root)
    folder = root / (f"{repeats}_colour" if layout == "kohya" else "img")
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        image = folder / f"{i:02d}_{name}.png"
        Image.fromarray(np.full((size, size, 3), rgb, dtype=np.uint8)).save(image)
        caption = f"a plain {name} picture"
        if layout == "imagefolder":
            rows.append({"file_name": image.relative_to(root).as_posix(), "text": caption})
        elif not (layout == "kohya" and i % 2):
            image.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    if rows:
        (root / METADATA_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root
