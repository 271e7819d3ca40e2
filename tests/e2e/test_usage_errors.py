"""Usage errors (a missing argument, a bad option or value, an unknown command) print one line
and exit 2, never a traceback: for every command the CLI registers, found by walking its tree,
so a new command is covered without touching this file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import typer

from lorajobs.orchestrator.cli import app, main
from tests.e2e.cli import CLI


def _leaves(cmd: object, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    subs = getattr(cmd, "commands", None)
    if subs:
        for name, sub in sorted(subs.items()):
            yield from _leaves(sub, (*path, name))
    else:
        yield path, cmd


COMMANDS = list(_leaves(typer.main.get_command(app)))


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return int(exit_info.value.code or 0), captured.err + captured.out


def _assert_one_line(code: int, output: str) -> None:
    assert code == 2, output
    assert "Traceback" not in output, output
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 2, output  # the error, and a "Try ... --help" hint
    assert lines[0].startswith("lorajobs: "), output


def test_the_command_tree_is_walked() -> None:
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"submit", "status", "show", "fetch", "data push", "db upgrade"} <= names


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=" ".join)
def test_an_unknown_option_is_a_usage_error(
    path: tuple[str, ...], capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAJOBS_HOME", str(tmp_path))
    _assert_one_line(*_run([*path, "--no-such-option"], capsys))


REQUIRED = [
    p
    for p, cmd in COMMANDS
    if any(getattr(param, "required", False) for param in getattr(cmd, "params", []))
]


@pytest.mark.parametrize("path", REQUIRED, ids=" ".join)
def test_a_missing_argument_is_a_usage_error(
    path: tuple[str, ...], capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAJOBS_HOME", str(tmp_path))
    _assert_one_line(*_run(list(path), capsys))
    assert not (tmp_path / "lorajobs.db").exists(), "a usage error must change nothing"


@pytest.mark.parametrize(
    "argv", [["show"], ["status", "--limit", "x"], ["no-such-command"], ["priority", "abc", "high"]]
)
def test_usage_errors_through_the_real_command(argv: list[str], tmp_path: Path) -> None:
    """As a user meets them: a subprocess, the console entry point's module."""
    result = CLI(home=tmp_path / "home")(*argv)
    _assert_one_line(result.code, result.err + result.out)
