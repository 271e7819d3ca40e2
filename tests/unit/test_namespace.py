"""One installed name: every import of our code goes through `lorajobs.*`."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
OURS = {"jobspecs", "orchestrator", "worker", "storage"}


def _python_files() -> list[Path]:
    dirs = ["jobspecs", "orchestrator", "worker", "storage", "tests", "bench"]
    return [p for d in dirs for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts]


def test_no_module_imports_our_folders_by_their_bare_names() -> None:
    bad = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            bad += [
                f"{path.relative_to(ROOT)}:{node.lineno} {n}"
                for n in names
                if n.split(".")[0] in OURS
            ]
    assert not bad, "import these as lorajobs.<name>:\n" + "\n".join(bad)


def test_every_package_folder_is_installed() -> None:
    """A folder with an `__init__.py` that pyproject does not list would be missing from wheels."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    found = set()
    for name, folder in tool["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *rel)))
    assert found == listed, f"unlisted: {sorted(found - listed)}; stale: {sorted(listed - found)}"


def test_bare_names_are_not_importable_outside_the_repository(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (
        "import importlib.util as u, lorajobs.worker, lorajobs.storage;"
        "print([n for n in ('worker','orchestrator','jobspecs','storage') if u.find_spec(n)])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "[]"


def test_the_spec_packages_lazy_names_are_all_exported() -> None:
    import lorajobs.jobspecs as js

    assert sorted(js.__all__) == sorted(js._EXPORTS)
    for name in js.__all__:
        assert getattr(js, name) is not None
