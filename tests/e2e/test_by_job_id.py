"""`reproduce`, `export --merge` and `merge` given JOB IDS, through the CLI as users run it: the
jobs ran through the queue (`submit --wait`: SQLite, local Ray, folder bucket), and each command
finds the adapter from the job's row, as `fetch` does. Also: a succeeded job leaves no
checkpoints in the bucket."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.e2e.cli import CLI
from tests.plugins.lora_outputs import text_logits, unet_output
from tests.plugins.specs import adapter_path, write_spec

pytestmark = pytest.mark.slow

WEIGHTS = "0.7,0.5"
# Two different adapters of each kind: rank 4, and rank 2 on fewer modules with another seed.
SECOND = {
    "image": {"rank": 2, "alpha": 1.0, "target_modules": ["to_q", "to_k"]},
    "text": {
        "rank": 2,
        "alpha": 4,
        "use_rslora": True,
        "target_modules": ["q_proj", "v_proj", "gate_proj"],
    },
}


@pytest.fixture(scope="module")
def ran(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_image_model: Path,
    tiny_text_model: Path,
    tiny_image_dataset: Path,
    tiny_text_dataset: Path,
) -> dict[str, Any]:
    """Four succeeded jobs (image a/b, text a/b) in one home: {"cli", "jobs": {key: job}}."""
    tmp = tmp_path_factory.mktemp("by-job-id")
    inputs = {
        "image": (tiny_image_model, tiny_image_dataset),
        "text": (tiny_text_model, tiny_text_dataset),
    }
    specs = []
    for kind, (model, data) in inputs.items():
        for which, seed in (("a", 1), ("b", 2)):
            over: dict[str, Any] = {"lora": SECOND[kind]} if which == "b" else {}
            specs.append(
                write_spec(
                    tmp / f"{kind}-{which}.yaml",
                    kind,
                    f"{kind}-{which}",
                    str(model),
                    str(data),
                    training={
                        "steps": 6,
                        "learning_rate": 1e-2,
                        "seed": seed,
                        "checkpoint_every": 2,
                    },
                    **over,
                )
            )
    cli = CLI(home=tmp / "home")
    r = cli("submit", *map(str, specs), "--wait", "--json")
    assert r.code == 0, r.err[-3000:]
    jobs = {j["name"]: j for j in r.json()}
    assert {j["state"] for j in jobs.values()} == {"succeeded"}
    return {"cli": cli, "jobs": jobs, "home": tmp / "home"}


def test_a_succeeded_job_leaves_no_checkpoints(ran: dict[str, Any]) -> None:
    bucket = ran["home"] / "bucket"
    for job in ran["jobs"].values():
        # Checkpoints at steps 2, 4, 6 (3 objects each), the last two kept until the end.
        assert job["result"]["checkpoints_removed"] == 6
        assert not (bucket / "jobs" / job["id"] / "checkpoints").exists()
        assert (bucket / "jobs" / job["id"] / "logs").is_dir()  # the rest of jobs/<id>/ stays


@pytest.mark.parametrize("kind", ["image", "text"])
def test_reproduce_a_job_by_its_id(kind: str, ran: dict[str, Any]) -> None:
    job = ran["jobs"][f"{kind}-a"]
    r = ran["cli"]("reproduce", job["id"][:8], "--json")  # a unique prefix will do
    assert r.code == 0, r.err[-3000:]
    report = r.json()
    assert report["match"] is True and report["job_id"] == job["id"]
    assert report["files"] and all(f["match"] for f in report["files"].values())


def test_export_merge_of_a_text_job(
    ran: dict[str, Any], tiny_text_model: Path, tmp_path: Path
) -> None:
    job = ran["jobs"]["text-a"]
    r = ran["cli"]("export", job["id"], "--merge", "-o", str(tmp_path / "full"))
    assert r.code == 0, r.err[-3000:]
    assert Path(r.out.strip()) == (tmp_path / "full").resolve()

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "full", local_files_only=True)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with_peft = text_logits(tiny_text_model, [adapter_path(job["adapter_uri"])])
    assert (with_peft - text_logits(tiny_text_model)).abs().max().item() > 1e-4
    torch.testing.assert_close(text_logits(tmp_path / "full"), with_peft, rtol=0, atol=1e-5)


def test_export_merge_of_an_image_job_says_what_it_supports(
    ran: dict[str, Any], tmp_path: Path
) -> None:
    r = ran["cli"]("export", ran["jobs"]["image-a"]["id"], "--merge", "-o", str(tmp_path / "x"))
    assert r.code == 2, r.err[-3000:]
    assert r.err.strip().splitlines()[-1].endswith("from text adapters only")
    assert "Traceback" not in r.err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind", ["image", "text"])
def test_merge_two_jobs_equals_their_weighted_stack(
    kind: str, ran: dict[str, Any], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    a, b = ran["jobs"][f"{kind}-a"], ran["jobs"][f"{kind}-b"]
    out = tmp_path / "merged"
    r = ran["cli"]("merge", a["id"], b["id"], "--weights", WEIGHTS, "-o", str(out))
    assert r.code == 0, r.err[-3000:]
    record = json.loads((out / "lorajobs-merge.json").read_text())
    assert [s["adapter"] for s in record["sources"]] == [a["id"], b["id"]]

    model = request.getfixturevalue(f"tiny_{kind}_model")
    output = unet_output if kind == "image" else text_logits
    weights = [float(w) for w in WEIGHTS.split(",")]
    want = output(model, [adapter_path(a["adapter_uri"]), adapter_path(b["adapter_uri"])], weights)
    assert (want - output(model)).abs().max().item() > 1e-4  # the stack does something
    torch.testing.assert_close(output(model, [out]), want, rtol=0, atol=1e-5)
