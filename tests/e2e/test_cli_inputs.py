"""Bad input through the CLI: one clear line per problem, exit code 2, nothing changed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.cli import CLI, write_spec

pytestmark = pytest.mark.slow


@pytest.fixture
def cli(tmp_path: Path) -> CLI:
    return CLI(home=tmp_path / "home")


def test_three_errors_reported_at_once_exit_2_nothing_inserted(cli: CLI, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "kind: text\nname: ok\nbase_model: /m\ndataset: /d\n"
        "training: {steps: 0, learning_rate: -1}\nlora: {rank: 0}\n"
    )
    r = cli("submit", str(bad))
    assert r.code == 2
    assert "3 errors" in r.err
    for field in ("training.steps", "training.learning_rate", "lora.rank"):
        assert field in r.err
    assert "Traceback" not in r.err and r.out == ""
    assert cli("status", "--json").json() == []


def test_one_bad_file_among_good_ones_inserts_nothing(cli: CLI, tmp_path: Path) -> None:
    good = write_spec(tmp_path / "good.yaml", "text", "fine", "file:///m", "file:///d.jsonl")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: text\n")
    r = cli("submit", str(good), str(bad))
    assert r.code == 2 and "bad.yaml" in r.err
    assert cli("status", "--json").json() == []


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("kind: text\nname: [unclosed\n", "not valid YAML at line"),
        ("- kind: text\n- kind: image\n", "got list"),
        ("", "got empty"),
    ],
)
def test_malformed_files_give_one_line(cli: CLI, tmp_path: Path, content: str, needle: str) -> None:
    f = tmp_path / "x.yaml"
    f.write_text(content)
    r = cli("validate", str(f))
    assert r.code == 2
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "x.yaml" in lines[0]


def test_validate_and_schema(cli: CLI) -> None:
    examples = sorted(
        (Path(__file__).resolve().parents[2] / "jobspecs" / "examples").glob("*.yaml")
    )
    r = cli("validate", *map(str, examples))
    assert r.code == 0, r.err
    schema = cli("schema").json()
    assert schema["discriminator"]["propertyName"] == "kind"


def test_unknown_job_is_bad_input(cli: CLI) -> None:
    r = cli("show", "deadbeef")
    assert r.code == 2 and "deadbeef" in r.err and "Traceback" not in r.err


def test_idempotency_key_returns_same_job(cli: CLI, tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "s.yaml", "text", "idem", "file:///m", "file:///d.jsonl")
    a = cli("submit", str(spec), "--idempotency-key", "k1")
    b = cli("submit", str(spec), "--idempotency-key", "k1")
    assert a.code == b.code == 0 and a.out == b.out
    assert len(cli("status", "--json").json()) == 1


def test_missing_dataset_fails_as_user_error_naming_the_uri(
    cli: CLI, tmp_path: Path, tiny_text_model: Path
) -> None:
    spec = write_spec(
        tmp_path / "s.yaml",
        "text",
        "nodata",
        str(tiny_text_model),
        "file:///nonexistent/lorajobs/data.jsonl",
    )
    r = cli("submit", str(spec), "--wait", "--json")
    assert r.code == 1
    (job,) = r.json()
    assert job["state"] == "failed" and job["failure_kind"] == "user"
    assert "/nonexistent/lorajobs/data.jsonl" in job["failure_reason"]
    assert job["attempt"] == 1  # user errors are not retried
    assert not (tmp_path / "home" / "bucket" / "adapters").exists()


def test_a_missing_local_path_is_bad_input_naming_the_resolved_path(
    cli: CLI, tmp_path: Path, tiny_text_dataset: Path
) -> None:
    """Relative paths resolve against the spec file's folder; one that does not exist there
    (or an absolute one that does not exist) is refused at submit: exit 2, nothing queued."""
    specs = tmp_path / "specs"
    specs.mkdir()
    relative = write_spec(specs / "rel.yaml", "text", "rel", "./models/llama", "data/train.jsonl")
    r = cli("submit", str(relative))
    assert r.code == 2 and "Traceback" not in r.err, r.err
    assert f"base_model: {specs / 'models' / 'llama'} does not exist" in r.err
    assert f"dataset: {specs / 'data' / 'train.jsonl'} does not exist" in r.err
    assert f"relative paths are read from {specs}" in r.err
    absolute = write_spec(
        tmp_path / "abs.yaml", "text", "abs", "/nonexistent/model", str(tiny_text_dataset)
    )
    r = cli("submit", str(absolute))
    assert r.code == 2 and "base_model: /nonexistent/model does not exist" in r.err
    assert cli("validate", str(relative)).code == 2
    assert cli("status", "--json").json() == []
    # A hub id (org/name) that is no local path stays a hub id.
    hub = write_spec(tmp_path / "hub.yaml", "text", "hub", "org/model", str(tiny_text_dataset))
    assert cli("validate", str(hub)).code == 0


def test_gpu_job_on_a_cpu_only_local_ray_fails_clearly(
    cli: CLI, tmp_path: Path, tiny_text_model: Path, tiny_text_dataset: Path
) -> None:
    spec = write_spec(
        tmp_path / "s.yaml",
        "text",
        "gpu",
        str(tiny_text_model),
        str(tiny_text_dataset),
        resources={"gpus": 1, "cpus": 1},
    )
    r = cli("submit", str(spec), "--wait", "--json")
    (job,) = r.json()
    assert r.code == 1 and job["failure_kind"] == "user"
    assert "GPU" in job["failure_reason"] and "resources.gpus: 0" in job["failure_reason"]


def test_db_upgrade_says_what_it_did_and_the_controller_starts_quietly(tmp_path: Path) -> None:
    from lorajobs.orchestrator.db import SCHEMA_HEAD

    cli = CLI(home=tmp_path / "home")
    first = cli("db", "upgrade")
    assert first.code == 0 and f"created the schema at revision {SCHEMA_HEAD}" in first.err
    again = cli("db", "upgrade")
    assert again.code == 0 and f"already at revision {SCHEMA_HEAD}" in again.err
    # A controller on a database it has to create: no Alembic chatter.
    fresh = CLI(home=tmp_path / "fresh")
    r = fresh("controller", "--once", timeout=180)
    assert r.code == 0, r.err[-2000:]
    assert "alembic" not in r.err.lower() and "Context impl" not in r.err, r.err


def test_dev_tiny_models_builds_models_and_sample_data_quietly(tmp_path: Path) -> None:
    r = CLI(home=tmp_path / "home")("dev", "tiny-models", "--out", str(tmp_path / "t"))
    assert r.code == 0, r.err
    assert r.err.strip() == "", r.err  # no library warnings, no progress bars
    printed = [Path(p) for p in r.out.split()]
    assert [p.name for p in printed] == [
        "tiny-sd",
        "tiny-sdxl",
        "tiny-flux",
        "tiny-llama",
        "shapes",
        "train.jsonl",
    ]
    assert all(p.exists() for p in printed)
    assert list((tmp_path / "t" / "data" / "shapes").glob("*.txt"))
    # Byte-identical on every run: a second build gives the same files.
    again = CLI(home=tmp_path / "home")("dev", "tiny-models", "--out", str(tmp_path / "t2"))
    assert again.code == 0, again.err
    first = sorted(p for p in (tmp_path / "t").rglob("*") if p.is_file())
    second = sorted(p for p in (tmp_path / "t2").rglob("*") if p.is_file())
    assert [p.relative_to(tmp_path / "t") for p in first] == [
        p.relative_to(tmp_path / "t2") for p in second
    ]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first, second))


def test_status_watch_piped_to_a_file_prints_tables(tmp_path: Path) -> None:
    import signal
    import subprocess
    import time

    from tests.e2e.cli import LORAJOBS

    cli = CLI(home=tmp_path / "home")
    spec = write_spec(tmp_path / "s.yaml", "text", "watched", "file:///m", "file:///d.jsonl")
    assert cli("submit", str(spec)).code == 0
    out = tmp_path / "watch.txt"
    with open(out, "wb") as f:
        p = subprocess.Popen([*LORAJOBS, "status", "--watch"], stdout=f, env=cli.environ())
        deadline = time.monotonic() + 60
        while out.read_text().count("watched") < 2 and time.monotonic() < deadline:
            time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=30) == 0
    text = out.read_text()
    assert text.count("watched") >= 2 and "STATE" in text, text
