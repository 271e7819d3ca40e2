"""Packing: every token kept, labels kept, less padding, and no attention across examples."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from lorajobs.jobspecs.models import TextJobSpec
from lorajobs.worker.trainers.text.data import build_text_dataset
from lorajobs.worker.trainers.text.packing import (
    IGNORE,
    TokenizedExample,
    UnitTable,
    collate_padded,
    pack,
)


def _examples(seed: int = 0, n: int = 40) -> list[TokenizedExample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(3, 30)
        ids = tuple(rng.randint(3, 300) for _ in range(length))
        cut = rng.randint(0, length - 1)  # a prompt of `cut` tokens without loss
        out.append(TokenizedExample(ids, (IGNORE,) * cut + ids[cut:], "f", i + 1))
    return out


def test_pack_keeps_every_token_and_label_and_respects_the_block_size() -> None:
    examples = _examples()
    blocks = pack(examples, 64)
    assert sorted(i for b in blocks for i in b.examples) == list(range(len(examples)))
    for b in blocks:
        assert len(b) <= 64
        pos = 0
        for i in b.examples:
            ex = examples[i]
            n = len(ex)
            assert b.input_ids[pos : pos + n] == ex.input_ids
            assert b.position_ids[pos : pos + n] == tuple(range(n))
            # Labels as unpacked, except the first, which must not be predicted across examples
            # (unpacked, the causal shift never uses it either).
            assert b.labels[pos] == IGNORE and b.labels[pos + 1 : pos + n] == ex.labels[1:]
            pos += n
    # Best-fit decreasing gets close to the lower bound on blocks.
    total = sum(len(e) for e in examples)
    assert len(blocks) <= -(-total // 64) + 1


@pytest.mark.parametrize("packed", [False, True])
def test_batches_from_the_unit_table_are_the_units_padded_row_by_row(packed: bool) -> None:
    """Gathered batches equal the plain construction: each unit in its row, then padding
    (pad id, label -100, mask 0 or a position run from 0), and counts of the real tokens and
    of the labels after the causal shift."""
    examples = _examples(seed=3)
    units = pack(examples, 48) if packed else examples
    table = UnitTable(units, packed=packed)
    for idx in ([0], [5, 1, 2], [len(units) - 1, 0, len(units) - 1, 3]):
        b = table.batch(idx, pad_id=7)
        width = max(len(units[i]) for i in idx)
        assert b.input_ids.shape == (len(idx), width) and b.input_ids.dtype == torch.long
        for row, i in enumerate(idx):
            u, n = units[i], len(units[i])
            assert b.input_ids[row].tolist() == list(u.input_ids) + [7] * (width - n)
            assert b.labels[row].tolist() == list(u.labels) + [IGNORE] * (width - n)
            if packed:
                assert b.attention_mask is None and b.position_ids is not None
                assert b.position_ids[row].tolist() == (
                    list(u.position_ids) + list(range(width - n))
                )
            else:
                assert b.position_ids is None and b.attention_mask is not None
                assert b.attention_mask[row].tolist() == [1] * n + [0] * (width - n)
        assert b.num_tokens == sum(len(units[i]) for i in idx)
        assert b.num_label_tokens == int((b.labels[:, 1:] != IGNORE).sum())


def test_pack_is_deterministic() -> None:
    assert pack(_examples(), 50) == pack(_examples(), 50)


def test_packing_reduces_padding(tmp_path: Path, tiny_text_model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_text_model, local_files_only=True)
    rng = random.Random(0)
    rows = [{"text": " ".join(["the cat likes apples."] * rng.randint(1, 8))} for _ in range(64)]
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    def spec(packing: bool) -> TextJobSpec:
        return TextJobSpec.model_validate(
            {
                "kind": "text",
                "name": "t",
                "base_model": "b",
                "dataset": "d",
                "training": {"steps": 1, "batch_size": 4, "max_seq_length": 256},
                "data": {"packing": packing},
            }
        )

    plain = build_text_dataset(f, spec(False), tok)
    packed = build_text_dataset(f, spec(True), tok)
    s_plain, s_packed = plain.stats(), packed.stats()
    assert (
        s_plain["tokens"] == s_packed["tokens"]
        and s_plain["label_tokens"] == s_packed["label_tokens"]
    )
    assert s_packed["useful_fraction"] > 0.9 > s_plain["useful_fraction"]
    assert s_packed["blocks"] < len(plain)
    b = packed.batch(0)
    assert b.attention_mask is None and b.position_ids is not None
    assert packed.batch(3).input_ids.equal(
        build_text_dataset(f, spec(True), tok).batch(3).input_ids
    )


def test_packed_examples_do_not_see_each_other(tiny_text_model: Path) -> None:
    """Each example's logits in a packed block equal its logits alone: no leakage."""
    from transformers import AutoModelForCausalLM

    from lorajobs.worker.trainers.text.packing import collate_packed

    model = AutoModelForCausalLM.from_pretrained(tiny_text_model, local_files_only=True)
    model.eval()
    examples = _examples(seed=1, n=6)
    blocks = pack(examples, 80)
    batch = collate_packed(blocks, pad_id=0)
    with torch.no_grad():
        packed_logits = model(**batch.model_inputs(), use_cache=False).logits
        for row, block in enumerate(blocks):
            pos = 0
            for i in block.examples:
                ex = examples[i]
                alone = collate_padded([ex], pad_id=0)
                ref = model(**alone.model_inputs(), use_cache=False).logits[0]
                got = packed_logits[row, pos : pos + len(ex)]
                assert torch.allclose(got, ref, atol=1e-5), (row, i)
                pos += len(ex)


@pytest.mark.parametrize("packing", [False, True])
def test_loss_over_packed_equals_mean_over_label_tokens(
    tiny_text_model: Path, packing: bool
) -> None:
    """The batch's loss is the mean over exactly the labelled tokens, packed or not."""
    from transformers import AutoModelForCausalLM

    from lorajobs.worker.trainers.text.packing import collate_packed

    model = AutoModelForCausalLM.from_pretrained(tiny_text_model, local_files_only=True)
    model.eval()
    examples = _examples(seed=2, n=5)
    with torch.no_grad():
        total = count = 0.0
        for ex in examples:
            out = model(**collate_padded([ex], 0).model_inputs(), use_cache=False)
            k = sum(1 for lab in ex.labels[1:] if lab != IGNORE)
            total += float(out.loss) * k
            count += k
        batch = collate_packed(pack(examples, 200), 0) if packing else collate_padded(examples, 0)
        loss = float(model(**batch.model_inputs(), use_cache=False).loss)
    assert batch.num_label_tokens == count
    assert loss == pytest.approx(total / count, abs=1e-5)
