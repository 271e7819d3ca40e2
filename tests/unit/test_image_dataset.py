"""The image dataset reader and the trainer's batch order: files in, tensors and errors out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lorajobs.jobspecs.failures import UserDataError
from lorajobs.worker.trainers.image.pixels import ImageCaptionDataset, image_files


def _png(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)
    return path


def test_reads_images_with_captions_in_sorted_order(tmp_path: Path) -> None:
    # Written out of order, in a subfolder too: the order must come from the names alone.
    _png(tmp_path / "b.png", (0, 0, 255))
    _png(tmp_path / "sub" / "a.jpg", (0, 255, 0))
    _png(tmp_path / "a.png", (255, 0, 0))
    (tmp_path / "a.txt").write_text("  a red square\n", encoding="utf-8")
    (tmp_path / "sub" / "a.txt").write_text("a green square", encoding="utf-8")
    (tmp_path / ".DS_Store").write_bytes(b"\x00junk")
    (tmp_path / "notes.md").write_text("not data", encoding="utf-8")

    ds = ImageCaptionDataset(tmp_path, resolution=32)

    assert [p.relative_to(tmp_path).as_posix() for p in ds.files] == ["a.png", "b.png", "sub/a.jpg"]
    assert ds.captions == ["a red square", "", "a green square"]  # b has no caption: ""
    assert len(ds) == 3
    item = ds[0]
    assert item.caption == "a red square"
    assert item.pixels.shape == (3, 32, 32) and item.pixels.dtype == torch.float32
    # Pure red in [-1, 1]: red channel at +1, the others at -1.
    assert torch.allclose(item.pixels[0], torch.ones(32, 32))
    assert torch.allclose(item.pixels[1:], -torch.ones(2, 32, 32))


def test_resizes_shorter_side_and_center_crops(tmp_path: Path) -> None:
    # 96x32: red | green | blue thirds. Shorter side → 16 gives 48x16; the center crop is green.
    arr = np.zeros((32, 96, 3), dtype=np.uint8)
    arr[:, :32, 0] = arr[:, 32:64, 1] = arr[:, 64:, 2] = 255
    Image.fromarray(arr).save(tmp_path / "wide.png")

    pixels = ImageCaptionDataset(tmp_path, resolution=16)[0].pixels

    assert pixels.shape == (3, 16, 16)
    center = pixels[:, :, 4:12]  # away from the crop edges, where bicubic blends neighbours
    assert center[1].min() > 0.95 and center[0].max() < -0.95 and center[2].max() < -0.95


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    pixels = ImageCaptionDataset(tmp_path, resolution=8)[0].pixels
    assert torch.allclose(pixels, torch.ones_like(pixels))


def test_undecodable_image_names_the_file(tmp_path: Path) -> None:
    _png(tmp_path / "good.png", (1, 2, 3))
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(UserDataError, match="broken.png"):
        ImageCaptionDataset(tmp_path, resolution=16)


def test_truncated_image_names_the_file(tmp_path: Path) -> None:
    # A valid header with the pixel data cut off: caught up front or when decoded, never raw.
    full = _png(tmp_path / "cut.png", (10, 20, 30), size=(64, 64)).read_bytes()
    (tmp_path / "cut.png").write_bytes(full[: len(full) // 2])
    with pytest.raises(UserDataError, match="cut.png"):
        ImageCaptionDataset(tmp_path, resolution=16)[0]


def test_unsupported_file_names_the_file(tmp_path: Path) -> None:
    _png(tmp_path / "good.png", (1, 2, 3))
    (tmp_path / "clip.gif").write_bytes(b"GIF89a")
    with pytest.raises(UserDataError, match="clip.gif"):
        ImageCaptionDataset(tmp_path, resolution=16)


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "orphan.txt").write_text("a caption without an image", encoding="utf-8")
    with pytest.raises(UserDataError, match=f"dataset {tmp_path}: no images found"):
        image_files(tmp_path)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(UserDataError, match="not a folder"):
        ImageCaptionDataset(tmp_path / "nope", resolution=16)


def test_caption_must_be_utf8(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", (1, 2, 3))
    (tmp_path / "a.txt").write_bytes(b"caf\xe9")
    with pytest.raises(UserDataError, match="a.txt"):
        ImageCaptionDataset(tmp_path, resolution=16)
