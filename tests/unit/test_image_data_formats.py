"""Image dataset layouts: captions, kohya repeat folders, HF imagefolder; detection; errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from lorajobs.jobspecs.failures import UserDataError
from lorajobs.jobspecs.models import ImageData
from lorajobs.worker.trainers.image.sources import detect_image_format, read_image_records


def _png(path: Path, size: tuple[int, int] = (16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(path)
    return path


def _rel(root: Path, records) -> list[tuple[str, str, int]]:
    return [(r.path.relative_to(root).as_posix(), r.caption, r.repeats) for r in records]


def test_captions_layout(tmp_path: Path) -> None:
    _png(tmp_path / "b.png")
    _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red thing\n", encoding="utf-8")
    assert detect_image_format(tmp_path) == "captions"
    assert _rel(tmp_path, read_image_records(tmp_path)) == [
        ("a.png", "a red thing", 1),
        ("b.png", "", 1),
    ]


def test_kohya_repeat_folders_use_concept_when_caption_missing(tmp_path: Path) -> None:
    _png(tmp_path / "10_sks dog" / "x.png")
    _png(tmp_path / "10_sks dog" / "y.png")
    (tmp_path / "10_sks dog" / "y.txt").write_text("sks dog on grass", encoding="utf-8")
    _png(tmp_path / "2_style" / "z.jpg")
    (tmp_path / "README.md").write_text("notes", encoding="utf-8")
    assert detect_image_format(tmp_path) == "kohya"
    assert _rel(tmp_path, read_image_records(tmp_path)) == [
        ("10_sks dog/x.png", "sks dog", 10),
        ("10_sks dog/y.png", "sks dog on grass", 10),
        ("2_style/z.jpg", "style", 2),
    ]


def test_kohya_bad_folder_name_is_named(tmp_path: Path) -> None:
    _png(tmp_path / "3_ok" / "a.png")
    _png(tmp_path / "misc" / "b.png")
    with pytest.raises(UserDataError, match="'misc' is not named N_concept"):
        read_image_records(tmp_path, ImageData(format="kohya"))


def test_imagefolder_metadata(tmp_path: Path) -> None:
    _png(tmp_path / "train" / "a.png")
    _png(tmp_path / "train" / "b.png")
    rows = [{"file_name": "train/b.png", "text": "bee"}, {"file_name": "train/a.png", "text": "ay"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert detect_image_format(tmp_path) == "imagefolder"
    assert _rel(tmp_path, read_image_records(tmp_path)) == [
        ("train/a.png", "ay", 1),
        ("train/b.png", "bee", 1),
    ]


def test_imagefolder_caption_column(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "prompt": "p", "text": "t"}\n')
    recs = read_image_records(tmp_path, ImageData(caption_column="prompt"))
    assert recs[0].caption == "p"


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"file_name": 3}', "line 2: 'file_name' must be a non-empty string"),
        ('{"file_name": "nope.png", "text": "x"}', "line 2: file_name 'nope.png': no such image"),
        ('{"file_name": "a.png", "text": "x"}', "line 2: file_name 'a.png' is listed twice"),
        ('{"file_name": "b.png", "text": 5}', "line 2: 'text' must be a string, got number"),
        ('{"file_name": "../x.png"}', "line 2: file_name '../x.png' points outside"),
        ("[1]", "line 2: expected a JSON object"),
    ],
)
def test_imagefolder_errors_name_file_and_line(tmp_path: Path, line: str, needle: str) -> None:
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n' + line + "\n")
    with pytest.raises(UserDataError, match="metadata.jsonl: " + needle.replace("(", r"\(")):
        read_image_records(tmp_path)


def test_imagefolder_unlisted_image_is_named(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _png(tmp_path / "extra.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n')
    with pytest.raises(UserDataError, match="extra.png: not listed"):
        read_image_records(tmp_path)


@pytest.mark.parametrize("fmt", ["captions", "imagefolder", "kohya"])
def test_require_captions_names_the_image(tmp_path: Path, fmt: str) -> None:
    if fmt == "kohya":  # the concept is a caption: only an empty concept leaves none
        _png(tmp_path / "1_" / "bare.png")
    else:
        _png(tmp_path / "bare.png")
    if fmt == "imagefolder":
        (tmp_path / "metadata.jsonl").write_text('{"file_name": "bare.png"}\n')
    read_image_records(tmp_path, ImageData(format=fmt))  # fine without the option
    with pytest.raises(UserDataError, match=r"bare.png: no caption"):
        read_image_records(tmp_path, ImageData(format=fmt, require_captions=True))
