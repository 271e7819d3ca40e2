"""Text formats, loss masks, chat templates, validation split, and errors naming file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorajobs.jobspecs.failures import UserDataError
from lorajobs.jobspecs.models import TextJobSpec
from lorajobs.worker.trainers.text.data import build_text_dataset, load_rows, split_validation
from lorajobs.worker.trainers.text.formats import ALPACA_PROMPT, to_records
from lorajobs.worker.trainers.text.packing import IGNORE


@pytest.fixture(scope="module")
def tok(tiny_text_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_text_model, local_files_only=True)


def _spec(**data) -> TextJobSpec:
    training = {"steps": 2, "batch_size": 2, "max_seq_length": 128, "seed": 1}
    training.update(data.pop("training", {}))
    return TextJobSpec.model_validate(
        {
            "kind": "text",
            "name": "t",
            "base_model": "b",
            "dataset": "d",
            "training": training,
            "data": data,
        }
    )


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _trained(tok, ex) -> str:
    return tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])


def test_text_format_trains_on_everything(tmp_path: Path, tok) -> None:
    f = _jsonl(tmp_path / "d.jsonl", [{"text": "the cat likes red apples."}])
    ex = build_text_dataset(f, _spec(), tok).examples[0]
    assert ex.input_ids[0] == tok.bos_token_id and ex.input_ids[-1] == tok.eos_token_id
    assert ex.labels[0] == IGNORE or ex.labels[0] == ex.input_ids[0]
    assert list(ex.labels[1:]) == list(ex.input_ids[1:])


def test_completion_masks_the_prompt_exactly(tmp_path: Path, tok) -> None:
    prompt, completion = "Q: what does the cat like?\nA:", " red apples."
    f = _jsonl(tmp_path / "d.jsonl", [{"prompt": prompt, "completion": completion}])
    ex = build_text_dataset(f, _spec(), tok).examples[0]
    assert _trained(tok, ex) == completion + tok.eos_token
    # Every token up to the end of the prompt is -100, every later one is its own id.
    n_prompt = len(tok(prompt)["input_ids"])
    assert all(lab == IGNORE for lab in ex.labels[:n_prompt])
    assert list(ex.labels[n_prompt:]) == list(ex.input_ids[n_prompt:])
    assert tok.decode(ex.input_ids, skip_special_tokens=True) == prompt + completion


def test_train_on_prompt_option(tmp_path: Path, tok) -> None:
    f = _jsonl(tmp_path / "d.jsonl", [{"prompt": "Q: hi", "completion": " yes"}])
    ex = build_text_dataset(f, _spec(train_on_prompt=True), tok).examples[0]
    assert list(ex.labels[1:]) == list(ex.input_ids[1:])


def test_alpaca_prompt_and_mask(tmp_path: Path, tok) -> None:
    rows = [
        {"instruction": "Name a colour.", "input": "", "output": "red"},
        {"instruction": "Repeat.", "input": "the cat", "output": "the cat"},
    ]
    f = _jsonl(tmp_path / "d.jsonl", rows)
    # The Alpaca preamble is long in a tiny BPE vocabulary: room for it.
    ds = build_text_dataset(f, _spec(training={"max_seq_length": 1024}), tok)
    a, b = ds.examples
    assert tok.decode(a.input_ids, skip_special_tokens=True).startswith(
        ALPACA_PROMPT.format(instruction="Name a colour.")
    )
    assert _trained(tok, a) == "red" + tok.eos_token
    assert "### Input:\nthe cat" in tok.decode(b.input_ids)
    assert _trained(tok, b) == "the cat" + tok.eos_token


CHAT = {
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello there"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "see you"},
    ]
}


def test_chat_with_the_tokenizers_template_trains_only_assistant_turns(tmp_path: Path, tok) -> None:
    f = _jsonl(tmp_path / "d.jsonl", [CHAT])
    ex = build_text_dataset(f, _spec(), tok).examples[0]
    eos = tok.eos_token
    assert tok.decode(ex.input_ids) == (
        f"{tok.bos_token}system: be brief\nuser: hi\nassistant: hello there{eos}\n"
        f"user: bye\nassistant: see you{eos}\n"
    )
    # Exactly the tokens of the two replies (and their EOS) carry labels; the role headers do
    # not. A token straddling the header/reply boundary (" see") counts as the reply's.
    assert _trained(tok, ex).split() == ["hello", f"there{eos}", "see", f"you{eos}"]
    text = tok.decode(ex.input_ids)
    assert text.count(tok.bos_token) == 1  # the template's BOS, not a second one


def test_chat_with_a_named_builtin_template(tmp_path: Path, tok) -> None:
    f = _jsonl(tmp_path / "d.jsonl", [CHAT])
    # ChatML markers are many tokens in a tiny vocabulary: room for them.
    spec = _spec(chat_template="chatml", training={"max_seq_length": 1024})
    ex = build_text_dataset(f, spec, tok).examples[0]
    assert tok.decode(ex.input_ids).startswith("<|im_start|>system\nbe brief<|im_end|>\n")
    assert _trained(tok, ex).split() == ["hello", "there<|im_end|>", "see", "you<|im_end|>"]


def test_tokenizer_without_template_needs_one_named(tmp_path: Path, tok) -> None:
    import copy

    bare = copy.deepcopy(tok)
    bare.chat_template = None
    f = _jsonl(tmp_path / "d.jsonl", [CHAT])
    with pytest.raises(UserDataError, match="no chat template"):
        build_text_dataset(f, _spec(), bare)
    assert build_text_dataset(f, _spec(chat_template="chatml"), bare).examples


def test_truncated_away_completion_is_dropped_and_all_gone_is_an_error(tmp_path: Path, tok) -> None:
    rows = [{"prompt": "word " * 50, "completion": " x"}, {"prompt": "Q", "completion": " yes"}]
    f = _jsonl(tmp_path / "d.jsonl", rows)
    ds = build_text_dataset(f, _spec(training={"max_seq_length": 16}), tok)
    assert len(ds.examples) == 1 and ds.dropped == 1
    with pytest.raises(UserDataError, match="no example has a token to train on"):
        build_text_dataset(
            _jsonl(tmp_path / "e.jsonl", rows[:1]), _spec(training={"max_seq_length": 16}), tok
        )


@pytest.mark.parametrize(
    ("lines", "needle"),
    [
        (['{"text": "ok"}', '{"text": 3}'], "line 2: 'text' must be a string, got number"),
        (
            ['{"prompt": "a", "completion": "b"}', '{"prompt": "a"}'],
            "line 2: missing the 'completion' field",
        ),
        (
            ['{"messages": [{"role": "user", "content": "hi"}]}'],
            "line 1: chat example has no assistant turn",
        ),
        (
            [
                '{"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "x"}]}'
            ],
            r"line 1: messages\[0\].content must be a string",
        ),
        (['{"messages": [{"role": "wizard", "content": "x"}]}'], r"line 1: messages\[0\].role"),
        (['{"messages": "hi"}'], "line 1: 'messages' must be a non-empty array"),
        (['{"question": "a", "answer": "b"}'], "line 1: unknown format"),
        (['{"instruction": "a", "output": ["b"]}'], "line 1: 'output' must be a string, got array"),
        (['{"text": "ok"}', "{oops"], "line 2: invalid JSON"),
    ],
)
def test_errors_name_file_and_line(tmp_path: Path, tok, lines: list[str], needle: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(UserDataError, match=f"bad.jsonl: {needle}"):
        build_text_dataset(f, _spec(), tok)


def test_invalid_utf8_and_empty_dataset(tmp_path: Path, tok) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    with pytest.raises(UserDataError, match="bad.jsonl: line 2: invalid UTF-8"):
        build_text_dataset(f, _spec(), tok)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(UserDataError, match="no examples"):
        build_text_dataset(empty, _spec(), tok)


def test_explicit_format_is_enforced(tmp_path: Path, tok) -> None:
    f = _jsonl(tmp_path / "d.jsonl", [{"text": "hello"}])
    with pytest.raises(UserDataError, match="line 1: missing the 'prompt' field"):
        build_text_dataset(f, _spec(format="completion"), tok)


def test_validation_split_is_seeded_and_disjoint(tmp_path: Path, tok) -> None:
    rows = load_rows(_jsonl(tmp_path / "d.jsonl", [{"text": f"row {i}"} for i in range(50)]))
    records = to_records(rows)
    train, val = split_validation(records, 0.1, seed=7)
    assert len(val) == 5 and len(train) == 45
    assert {r.line for r in train}.isdisjoint({r.line for r in val})
    assert split_validation(records, 0.1, seed=7) == (train, val)
    assert split_validation(records, 0.1, seed=8)[1] != val
    ds = build_text_dataset(tmp_path / "d.jsonl", _spec(validation_split=0.1), tok)
    assert len(ds.examples) == 45 and len(ds.validation) == 5
    assert sum(b.input_ids.shape[0] for b in ds.eval_batches()) == 5


def test_validation_file(tmp_path: Path, tok) -> None:
    train = _jsonl(tmp_path / "t.jsonl", [{"text": "a b c"}] * 4)
    val = _jsonl(tmp_path / "v.jsonl", [{"text": "d e"}] * 2)
    ds = build_text_dataset(train, _spec(validation="s3://b/v.jsonl"), tok, validation_path=val)
    assert len(ds.examples) == 4 and len(ds.validation) == 2
    with pytest.raises(UserDataError, match="v2.jsonl: line 1: missing the 'text' field"):
        build_text_dataset(
            train, _spec(), tok, validation_path=_jsonl(tmp_path / "v2.jsonl", [{"prompt": "x"}])
        )


def test_spec_refuses_two_validation_sources() -> None:
    from lorajobs.jobspecs import SpecError, load_spec_text

    text = (
        "kind: text\nname: t\nbase_model: b\ndataset: d\ntraining: {steps: 1}\n"
        "data: {validation: v.jsonl, validation_split: 0.1}\n"
    )
    with pytest.raises(SpecError, match="not both"):
        load_spec_text(text)


def test_slow_tokenizer_path_gives_the_same_mask(tok) -> None:
    """Tokenizers without offsets locate spans by prefix token counts: same result here."""
    from lorajobs.worker.jsonl import JsonRow
    from lorajobs.worker.trainers.text.data import encode_record

    class Slow:  # the fast tokenizer, seen as one without offset mappings
        is_fast = False
        eos_token_id = tok.eos_token_id

        def __call__(self, *args, **kwargs):
            kwargs.pop("return_offsets_mapping", None)
            return tok(*args, **kwargs)

    row = JsonRow({"prompt": "Q: the cat?\n", "completion": "the cat likes red apples."}, "f", 1)
    record = to_records([row])[0]
    assert encode_record(record, Slow(), 256) == encode_record(record, tok, 256)
