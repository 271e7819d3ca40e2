"""The packing policy (pure): which jobs may share an attempt, how many, and when it is worth
it; plus the content digest that decides "the same base model"."""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from lorajobs.orchestrator import packing
from lorajobs.orchestrator.records import JobRecord
from lorajobs.orchestrator.states import JobStatus
from lorajobs.storage.identity import content_digest

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _spec(**over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "kind": "text",
        "base_model": "s3://models/a",
        "lora": {"rank": 8},
        "training": {"steps": 100, "max_seq_length": 256, "mixed_precision": "no"},
        "data": {"packing": False},
        "resources": {"gpus": 1, "gpu_type": None, "cpus": 1, "memory_gb": None, "pack": "auto"},
    }
    for path, value in over.items():
        *parents, leaf = path.split("__")
        node = spec
        for p in parents:
            node = node[p]
        node[leaf] = value
    return spec


def _job(job_id: str, spec: dict[str, Any], not_before: datetime | None = None) -> JobRecord:
    return JobRecord(
        id=job_id, name=job_id, kind=spec["kind"], owner="o", priority=0,
        status=JobStatus.queued, spec=spec, output_uri="file:///b", idempotency_key=None,
        attempt=1, gpus=1, gpu_type=None, cpus=1, created_at=NOW, updated_at=NOW,
        dispatched_at=None, started_at=None, finished_at=None, failure_kind=None,
        failure_reason=None, cancel_requested=False, step=None, total_steps=None, loss=None,
        it_per_s=None, node=None, result=None, lease_owner=None, lease_expires_at=None,
        not_before=not_before,
    )  # fmt: skip


def test_same_key_needs_same_kind_base_length_precision_and_shape() -> None:
    base = packing.pack_key(_spec(), "d1")
    assert base is not None
    assert packing.pack_key(_spec(lora__rank=64, training__steps=5), "d1") == base
    assert packing.pack_key(_spec(), "d2") != base  # another base model (by content)
    assert packing.pack_key(_spec(training__max_seq_length=512), "d1") != base
    assert packing.pack_key(_spec(training__mixed_precision="bf16"), "d1") != base
    assert packing.pack_key(_spec(resources__cpus=2), "d1") != base
    assert packing.pack_key(_spec(data__packing=True), "d1") != base
    # A gang (several GPUs, on Ray Train) always trains alone.
    assert packing.pack_key(_spec(resources__gpus=2), "d1") is None
    image = _spec(kind="image", training__resolution=512)
    assert packing.pack_key(image, "d1") not in (None, base)  # another kind


def _image(**over: Any) -> dict[str, Any]:
    spec = _spec(kind="image", **{"training__resolution": 64, **over})
    spec["training"].pop("max_seq_length")
    spec["data"] = {"bucketing": False}
    return spec


def test_image_jobs_of_other_bases_resolutions_or_settings_are_never_packed_together() -> None:
    base = packing.pack_key(_image(), "sd")
    assert base is not None
    assert packing.pack_key(_image(lora__rank=2, training__steps=7), "sd") == base
    assert packing.pack_key(_image(training__resolution=128), "sd") != base
    assert packing.pack_key(_image(), "sdxl") != base  # another base (by content)
    assert packing.pack_key(_image(training__mixed_precision="bf16"), "sd") != base
    assert packing.pack_key(_spec(), "sd") != base  # a text job on the same digest
    # What the image pack trainer does not take trains alone.
    assert packing.pack_key(_image(), "flux", unet_base=False) is None
    assert packing.pack_key(_image(training__train_text_encoder=True), "sd") is None
    assert packing.pack_key(_image(training__quantize_base=True), "sd") is None
    bucketed = _image()
    bucketed["data"]["bucketing"] = True
    assert packing.pack_key(bucketed, "sd") is None
    sampled = {**_image(), "samples": {"prompts": ["a cat"]}}
    assert packing.pack_key(sampled, "sd") is None


def test_keys_read_whether_an_image_base_is_a_unet_pipeline(tmp_path: Path) -> None:
    sd, flux = tmp_path / "sd", tmp_path / "flux"
    (sd / "unet").mkdir(parents=True)
    (sd / "unet" / "config.json").write_text("{}")
    (flux / "transformer").mkdir(parents=True)
    (flux / "transformer" / "config.json").write_text("{}")
    keys = packing.Keys(digest=lambda uri: "d:" + uri)
    assert keys(_job("a", {**_image(), "base_model": sd.as_uri()})) is not None
    assert keys(_job("b", {**_image(), "base_model": str(flux)})) is None
    assert keys(_job("c", {**_image(), "base_model": str(tmp_path / "absent")})) is None


def test_never_dora_and_checkpointing_train_alone() -> None:
    assert packing.pack_key(_spec(resources__pack="never"), "d") is None
    assert packing.pack_key(_spec(lora__use_dora=True), "d") is None
    assert packing.pack_key(_spec(training__gradient_checkpointing=True), "d") is None


def test_limit_from_spec_and_memory_estimate() -> None:
    config = {"hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192,
              "vocab_size": 32000}  # fmt: skip
    assert packing.limit(_spec(), 0.0, None) == packing.DEFAULT_MAX
    assert packing.limit(_spec(resources__pack=3), 0.0, None) == 3
    per_job = packing.estimate_gb(_spec(), 2.0, config)
    assert 0.1 < per_job < 5
    fits = packing.limit(_spec(resources__memory_gb=2.0 + 2.5 * per_job), 2.0, config)
    assert fits == 2
    assert packing.limit(_spec(resources__memory_gb=1.0), 2.0, config) == 1  # base alone


def test_a_member_joins_while_it_shortens_the_expected_completion(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(packing, "ROUND_COST", 0.5)
    # Four equal jobs packed: 100 rounds at 1 + 0.5 * 3 = 250, against 200 + 100 after.
    assert packing.pack_length([100, 100, 100, 100]) == 250
    assert packing.worth_packing(100, [100, 100], 100)
    # Jobs leave as they finish: 10 rounds of 2, then 90 alone.
    assert packing.pack_length([10, 100]) == 10 * 1.5 + 90
    assert packing.worth_packing(100, [], 2000)  # a long job gains from its shared rounds
    monkeypatch.setattr(packing, "ROUND_COST", 1.0)  # no sharing at all: never worth it
    assert not packing.worth_packing(100, [], 100)


def test_choose_members_keeps_to_key_backoff_size_and_each_jobs_own_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(packing, "ROUND_COST", 0.05)
    leader = _job("L", _spec())
    queued = [
        _job("other-base", _spec(base_model="s3://models/b")),
        _job("a", _spec()),
        _job("backoff", _spec(), not_before=NOW + timedelta(seconds=30)),
        _job("small-cap", _spec(resources__pack=2)),  # would be the third job of the pack
        _job("b", _spec()),
        _job("c", _spec()),
        _job("d", _spec()),
    ]
    digests = {"s3://models/a": "A", "s3://models/b": "B"}
    keys = packing.Keys(digest=digests.__getitem__)
    chosen = packing.choose_members(leader, queued, keys, 4, NOW)
    assert [j.id for j in chosen] == ["a", "b", "c"]
    assert (
        packing.choose_members(_job("n", _spec(resources__pack="never")), queued, keys, 4, NOW)
        == []
    )


def test_outcomes_and_cost_are_split_per_member() -> None:
    whole = {
        "pack": ["a", "b"],
        "jobs": {"a": {"ok": True, "work": 300}, "b": {"ok": False, "work": 100}},
    }
    assert packing.member_outcome(whole, "b") == {"ok": False, "work": 100, "pack": ["a", "b"]}
    assert packing.cost_share(whole, "a") == 0.75 and packing.cost_share(whole, "b") == 0.25
    lost = {"ok": False, "node_lost": True}
    assert packing.member_outcome(lost, "a") is lost and packing.cost_share(lost, "a") == 1.0


def test_the_same_model_at_two_uris_has_one_digest(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.mkdir()
    (a / "config.json").write_text('{"hidden_size": 8}')
    (a / "model.safetensors").write_bytes(b"\x00" * 100)
    b = tmp_path / "copy"
    shutil.copytree(a, b)
    assert content_digest(str(a)) == content_digest(b.as_uri())
    (b / "model.safetensors").write_bytes(b"\x01" * 100)
    assert content_digest(str(a)) != content_digest(str(b))


def test_a_member_stopped_by_its_pack_leaders_preemption_is_not_charged() -> None:
    # The round's victim is the pack's hold (its first job); a SIGTERM that lands during the
    # pull ends every member with an infra error. Each member counts as asked to stop when the
    # leader was asked after the member's own attempt began (not by an older request).
    from dataclasses import replace

    from lorajobs.orchestrator.preempting import pack_asked

    began = NOW - timedelta(minutes=20)
    member = replace(_job("m", _spec()), status=JobStatus.running, dispatched_at=began, pack_id="l")
    leader = replace(_job("l", _spec()), status=JobStatus.running, dispatched_at=began, pack_id="l")
    assert not pack_asked(member, leader)
    assert pack_asked(member, replace(leader, preempt_at=NOW, preempted_by="urgent"))
    older = replace(leader, preempt_at=began - timedelta(hours=1))
    assert not pack_asked(member, older)
