"""The JSONL text reader: examples in order, and errors that name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorajobs.jobspecs.failures import UserDataError
from lorajobs.worker.trainers.text.plain import load_text_examples, tokenize_examples


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reads_a_file_in_order_skipping_blank_lines(tmp_path: Path) -> None:
    f = _write(tmp_path / "d.jsonl", ['{"text": "one"}', "", '{"text": "two", "x": 1}'])
    got = load_text_examples(f)
    assert [e.text for e in got] == ["one", "two"]
    assert [e.line for e in got] == [1, 3]


def test_reads_a_folder_of_jsonl_files_in_sorted_order(tmp_path: Path) -> None:
    _write(tmp_path / "b.jsonl", ['{"text": "b1"}'])
    _write(tmp_path / "a.jsonl", ['{"text": "a1"}', '{"text": "a2"}'])
    (tmp_path / "notes.txt").write_text("not data")
    assert [e.text for e in load_text_examples(tmp_path)] == ["a1", "a2", "b1"]


def test_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    f = _write(tmp_path / "bad.jsonl", ['{"text": "a"}', '{"text": "b"}', '{"text": oops}'])
    with pytest.raises(UserDataError, match=r"bad\.jsonl: line 3: invalid JSON"):
        load_text_examples(f)


def test_invalid_utf8_names_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserDataError, match=r"latin1\.jsonl: line 2: invalid UTF-8"):
        load_text_examples(f)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "no text here"}, "missing the 'text' field"),
        ({"text": 42}, "'text' must be a string, got int"),
        (["text"], "expected a JSON object, got list"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path: Path, row: object, message: str) -> None:
    f = _write(tmp_path / "rows.jsonl", ['{"text": "ok"}', json.dumps(row)])
    with pytest.raises(UserDataError) as err:
        load_text_examples(f)
    assert str(err.value).startswith(f"{f}: line 2: ")
    assert message in str(err.value)


def test_an_error_in_the_second_file_names_that_file(tmp_path: Path) -> None:
    _write(tmp_path / "a.jsonl", ['{"text": "fine"}'])
    bad = _write(tmp_path / "b.jsonl", ["{"])
    with pytest.raises(UserDataError, match=rf"{bad}: line 1: invalid JSON"):
        load_text_examples(tmp_path)


def test_empty_file_has_no_examples(tmp_path: Path) -> None:
    f = tmp_path / "empty.jsonl"
    f.write_text("\n\n")
    with pytest.raises(UserDataError, match=rf"^dataset {f}: no examples$"):
        load_text_examples(f)


def test_folder_without_jsonl_has_no_examples(tmp_path: Path) -> None:
    with pytest.raises(UserDataError, match="no examples"):
        load_text_examples(tmp_path)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(UserDataError, match="not found"):
        load_text_examples(tmp_path / "nope.jsonl")


def test_tokenize_adds_bos_and_eos_and_truncates(tiny_text_model: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_text_model, local_files_only=True)
    long = "the cat likes red apples. " * 40
    rows = [json.dumps({"text": "a dog sees"}), json.dumps({"text": long})]
    f = _write(tmp_path / "d.jsonl", rows)
    short_ids, long_ids = tokenize_examples(load_text_examples(f), tok, max_seq_length=16)
    assert short_ids[0] == tok.bos_token_id and short_ids[-1] == tok.eos_token_id
    assert tok.decode(short_ids[1:-1]) == "a dog sees"
    assert len(long_ids) == 16  # truncated; EOS does not fit
