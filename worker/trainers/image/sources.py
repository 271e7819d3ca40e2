"""Image dataset layouts: which images a dataset holds, with their raw captions and repeats.

Three layouts, chosen by `data.format` or detected (`auto`):

- `captions`: images anywhere under the folder, each captioned by a same-name `.txt`.
- `kohya`: top-level folders named `N_concept`; every image in one is seen N times per epoch,
  and `concept` is its caption when it has no `.txt`.
- `imagefolder`: Hugging Face imagefolder, a `metadata.jsonl` at the top with `file_name` and a
  caption column (`text`, else `caption`, or `data.caption_column`).

Detection: `metadata.jsonl` at the top → imagefolder; else only `N_concept` folders (and no loose
images) at the top → kohya; else captions. Every problem is a `UserDataError` naming the file
(and the line, for `metadata.jsonl`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lorajobs.jobspecs.failures import UserDataError
from lorajobs.jobspecs.models import ImageData
from lorajobs.worker.jsonl import read_rows, type_name
from lorajobs.worker.trainers.image.pixels import (
    _IGNORED_SUFFIXES,
    IMAGE_SUFFIXES,
    image_files,
    read_caption,
)

METADATA_FILE = "metadata.jsonl"
KOHYA_DIR_RE = re.compile(r"^(\d+)_(.*)$")


@dataclass(frozen=True)
class ImageRecord:
    """One image of the dataset, before any per-epoch caption option is applied."""

    path: Path
    caption: str  # "" when the image has none
    repeats: int = 1  # times the image is seen per epoch (kohya N_concept folders)

    @property
    def source(self) -> str:
        return str(self.path)


def detect_image_format(root: Path) -> str:
    """`imagefolder`, `kohya` or `captions`, from the layout of `root`."""
    if not root.is_dir():
        raise UserDataError(f"dataset {root}: not a folder")
    if (root / METADATA_FILE).is_file():
        return "imagefolder"
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    dirs = [p for p in entries if p.is_dir()]
    loose_images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if dirs and not loose_images and all(KOHYA_DIR_RE.match(d.name) for d in dirs):
        return "kohya"
    return "captions"


def read_image_records(root: Path, data: ImageData | None = None) -> list[ImageRecord]:
    """The dataset's images in a stable order, with raw captions and repeats."""
    data = data or ImageData()
    root = Path(root)
    fmt = detect_image_format(root) if data.format == "auto" else data.format
    if not root.is_dir():
        raise UserDataError(f"dataset {root}: not a folder")
    if fmt == "captions":
        records = [ImageRecord(p, read_caption(p)) for p in image_files(root)]
    elif fmt == "kohya":
        records = _kohya(root)
    elif fmt == "imagefolder":
        records = _imagefolder(root, data.caption_column)
    else:  # the spec's Literal makes this unreachable; kept for callers passing a raw format
        raise UserDataError(f"dataset {root}: unknown image dataset format {fmt!r}")
    if data.require_captions:
        for r in records:
            if not r.caption:
                raise UserDataError(
                    f"{r.path}: no caption (data.require_captions is on; "
                    f"{_caption_hint(fmt, r.path)})"
                )
    return records


def _caption_hint(fmt: str, path: Path) -> str:
    if fmt == "imagefolder":
        return f"give it a caption in {METADATA_FILE}"
    return f"write one to {path.with_suffix('.txt').name}"


def _kohya(root: Path) -> list[ImageRecord]:
    records: list[ImageRecord] = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_file():
            if entry.suffix.lower() in _IGNORED_SUFFIXES:
                continue  # a README or a config next to the concept folders
            raise UserDataError(
                f"dataset {root}: {entry.name} is outside the N_concept folders of a kohya dataset"
            )
        match = KOHYA_DIR_RE.match(entry.name)
        if not match:
            raise UserDataError(
                f"dataset {root}: folder {entry.name!r} is not named N_concept "
                "(e.g. 10_sks dog: 10 repeats of the concept 'sks dog')"
            )
        repeats, concept = int(match.group(1)), match.group(2).strip()
        if repeats < 1:
            raise UserDataError(f"dataset {root}: folder {entry.name!r} has 0 repeats")
        for path in image_files(entry):
            records.append(ImageRecord(path, read_caption(path) or concept, repeats))
    if not records:
        raise UserDataError(f"dataset {root}: no images found")
    return records


def _imagefolder(root: Path, caption_column: str | None) -> list[ImageRecord]:
    meta = root / METADATA_FILE
    if not meta.is_file():
        raise UserDataError(f"dataset {root}: no {METADATA_FILE} (data.format is imagefolder)")
    captions: dict[Path, str] = {}
    for row in read_rows(meta):
        name = row.data.get("file_name")
        if not isinstance(name, str) or not name:
            got = "missing" if name is None else f"a {type_name(name)}"
            raise UserDataError(f"{row.where}: 'file_name' must be a non-empty string ({got})")
        path = (root / name).resolve()
        if root.resolve() not in path.parents:
            raise UserDataError(f"{row.where}: file_name {name!r} points outside the dataset")
        if path in captions:
            raise UserDataError(f"{row.where}: file_name {name!r} is listed twice")
        if not path.is_file():
            raise UserDataError(f"{row.where}: file_name {name!r}: no such image")
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise UserDataError(f"{row.where}: file_name {name!r} is not a supported image")
        captions[path] = _row_caption(row.data, caption_column, row.where)
    # Every image in the folder must be listed: training on fewer than the user meant is worse
    # than refusing.
    files = image_files(root)
    for path in files:
        if path.resolve() not in captions:
            raise UserDataError(f"{path}: not listed in {meta}")
    return [ImageRecord(p, captions[p.resolve()]) for p in files]


def _row_caption(row: dict, column: str | None, where: str) -> str:
    if column is None:
        column = next((c for c in ("text", "caption") if c in row), None)
        if column is None:
            return ""
    value = row.get(column)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserDataError(f"{where}: {column!r} must be a string, got {type_name(value)}")
    return value.strip()
