"""Image datasets: a folder of images with same-name `.txt` captions (the kohya convention).

`photo.png` is captioned by `photo.txt` next to it; subfolders are read too. Images are resized
(shorter side to the resolution), center-cropped to a square and scaled to [-1, 1], the range
a diffusion VAE expects. Every problem is a `UserDataError` naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from jobspecs.errors import UserDataError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
# Files that may sit next to the images without being data: captions and common notes.
_IGNORED_SUFFIXES = frozenset({".txt", ".json", ".jsonl", ".md", ".toml", ".yaml", ".yml"})


@dataclass(frozen=True)
class ImageExample:
    """One training image, ready for the VAE, with its caption."""

    pixels: torch.Tensor  # (3, resolution, resolution), float32 in [-1, 1]
    caption: str
    source: str  # file path, for error messages and the manifest


def image_files(root: Path) -> list[Path]:
    """The images under `root`, sorted by relative path so order never depends on the listing."""
    if not root.is_dir():
        raise UserDataError(f"dataset {root}: not a folder")
    found: list[Path] = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue  # .DS_Store, .git and friends
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            found.append(path)
        elif suffix not in _IGNORED_SUFFIXES:
            # Better to refuse than to silently train on fewer images than the user meant.
            raise UserDataError(
                f"dataset {root}: {rel.as_posix()} is not a supported image "
                f"(expected {', '.join(sorted(s[1:] for s in IMAGE_SUFFIXES))} with .txt captions)"
            )
    if not found:
        raise UserDataError(f"dataset {root}: no images found")
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def read_caption(image: Path) -> str:
    """The caption in `<image stem>.txt`, stripped; "" when there is none."""
    path = image.with_suffix(".txt")
    if not path.is_file():
        return ""
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as err:
        raise UserDataError(f"{path}: caption is not valid UTF-8 (byte {err.start})") from None


def load_pixels(path: Path, resolution: int) -> torch.Tensor:
    """Decode, resize the shorter side to `resolution`, center-crop, scale to [-1, 1]."""
    try:
        with Image.open(path) as raw:
            raw.load()
            img = ImageOps.exif_transpose(raw)  # phones store rotation in EXIF
    except Exception as err:  # decoders raise many types (OSError, SyntaxError, struct.error)
        raise UserDataError(f"{path}: cannot be decoded as an image ({err})") from None
    img = _to_rgb(img)
    scale = resolution / min(img.size)
    size = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.BICUBIC)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def _to_rgb(img: Image.Image) -> Image.Image:
    # Transparent pixels go onto white: dropping alpha would expose whatever colour the
    # invisible pixels happen to store (often black).
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


class ImageCaptionDataset:
    """A folder of captioned images; items are decoded on access, files checked up front."""

    def __init__(self, root: Path, resolution: int) -> None:
        self.root = Path(root)
        self.resolution = resolution
        self.files = image_files(self.root)
        self.captions = [read_caption(p) for p in self.files]
        for path in self.files:
            _check_decodable(path)  # fail before the model loads, not halfway through encoding

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> ImageExample:
        path = self.files[index]
        return ImageExample(load_pixels(path, self.resolution), self.captions[index], str(path))


def _check_decodable(path: Path) -> None:
    try:
        with Image.open(path) as img:
            img.verify()  # reads headers and checksums without decoding every pixel
    except Exception as err:  # decoders raise many types (OSError, SyntaxError, struct.error)
        raise UserDataError(f"{path}: cannot be decoded as an image ({err})") from None
