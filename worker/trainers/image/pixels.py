"""Image files: listing, captions, decoding, resizing and cropping (the kohya `.txt` convention).

`photo.png` is captioned by `photo.txt` next to it; subfolders are read too. `ImageCaptionDataset`
resizes (shorter side to the resolution), center-crops to a square and scales to [-1, 1], the
range a diffusion VAE expects. Bucketed, multi-format training sets are built on these helpers
in `image_dataset.py`. Every problem is a `UserDataError` naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from lorajobs.jobspecs.failures import UserDataError

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


def open_rgb(path: Path) -> Image.Image:
    """Decode an image upright (EXIF rotation applied), alpha composited onto white, as RGB."""
    try:
        with Image.open(path) as raw:
            raw.load()
            img = ImageOps.exif_transpose(raw)  # phones store rotation in EXIF
    except Exception as err:  # decoders raise many types (OSError, SyntaxError, struct.error)
        raise UserDataError(f"{path}: cannot be decoded as an image ({err})") from None
    return _to_rgb(img)


def resize_and_crop(
    img: Image.Image, width: int, height: int, top_left: tuple[int, int] | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Resize `img` to cover `width` x `height`, then crop to it; returns (image, (top, left)).

    The crop is centred unless `top_left` (in the resized image, clamped to fit) is given.
    """
    img = img.resize(cover_size(img.width, img.height, width, height), Image.Resampling.BICUBIC)
    if top_left is None:
        top, left = (img.height - height) // 2, (img.width - width) // 2
    else:
        top = min(max(top_left[0], 0), img.height - height)
        left = min(max(top_left[1], 0), img.width - width)
    return img.crop((left, top, left + width, top + height)), (top, left)


def cover_size(w: int, h: int, width: int, height: int) -> tuple[int, int]:
    """(width, height) of a `w` x `h` image scaled to just cover `width` x `height`."""
    scale = max(width / w, height / h)
    return max(width, round(w * scale)), max(height, round(h * scale))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB image as a (3, H, W) float32 tensor in [-1, 1], the range a diffusion VAE expects."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def load_pixels(path: Path, resolution: int) -> torch.Tensor:
    """Decode, resize the shorter side to `resolution`, center-crop, scale to [-1, 1]."""
    img, _ = resize_and_crop(open_rgb(path), resolution, resolution)
    return to_tensor(img)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as the image is shown (EXIF rotation applied); checks it is decodable."""
    _check_decodable(path)
    try:
        with Image.open(path) as img:
            width, height = img.size
            # EXIF orientations 5-8 are quarter turns: the displayed image is transposed.
            if img.getexif().get(0x0112) in (5, 6, 7, 8):
                width, height = height, width
    except Exception as err:  # decoders raise many types (OSError, SyntaxError, struct.error)
        raise UserDataError(f"{path}: cannot be decoded as an image ({err})") from None
    return width, height


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
