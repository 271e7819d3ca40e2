"""The dashboard in a real browser: Debian's Chromium driven by Playwright against a real
`lorajobs server` and controller. Sign in with a token, watch a running job's progress advance
and its loss chart draw, cancel it, and see that another owner's job is absent. Screenshots are
kept under `test-artifacts/dashboard/`."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.cli import CLI, write_spec
from tests.plugins.service import ApiServer, start_api_server

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard"
#: Headless, and nothing that reaches past 127.0.0.1 (the machine's network is closed).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:  # a test that needs the browser fails without it: never a skip
        pytest.fail("Chromium not installed: apt-get install chromium (make test does)")
    return found


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[dict[str, Any]]:
    bucket = f"file://{(tmp_path / 'server' / 'bucket').as_posix()}"
    env = {
        "LORAJOBS_DATABASE_URL": f"sqlite:///{tmp_path / 'server' / 'lorajobs.db'}",
        "LORAJOBS_BUCKET": bucket,
        "LORAJOBS_TENANCY": "shared",
        "LORAJOBS_ALLOW_CPU_FALLBACK": "1",
    }
    server = start_api_server(tmp_path / "server", env)
    controller = CLI(home=tmp_path / "controller", env=env).popen(
        "controller", log=tmp_path / "controller.log"
    )
    try:
        yield {"server": server, "bucket": bucket}
    finally:
        os.kill(controller.pid, 15)
        controller.wait(timeout=60)
        server.stop()


def _submit(server: ApiServer, token: str, tmp: Path, name: str, model: Path, data: Path) -> str:
    user = server.client(token, tmp / f"user-{name}")
    spec = write_spec(
        tmp / f"{name}.yaml",
        "text",
        name,
        str(model),
        str(data),
        training={"steps": 100000, "learning_rate": 1e-3},
    )
    r = user("submit", str(spec))
    assert r.code == 0, r.err
    return r.out.strip()


def _wait(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_dashboard_in_chromium(
    deployment: dict[str, Any], tmp_path: Path, tiny_text_model: Path, tiny_text_dataset: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    server: ApiServer = deployment["server"]
    acme, globex = server.token("acme"), server.token("globex")
    job = _submit(server, acme, tmp_path, "watched", tiny_text_model, tiny_text_dataset)
    theirs = _submit(server, globex, tmp_path, "theirs", tiny_text_model, tiny_text_dataset)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(server.url + "/")
        assert page.url.endswith("/login")
        page.fill("#token", "lj_wrong_token")
        page.click("#signin")
        page.wait_for_selector("p.error")
        page.fill("#token", acme)
        page.click("#signin")
        page.wait_for_selector(f"tr[data-job='{job}']")
        assert page.locator(f"tr[data-job='{theirs}']").count() == 0  # globex's job is absent
        assert "theirs" not in page.inner_text("#jobs")
        page.screenshot(path=str(ARTIFACTS / "queue.png"), full_page=True)

        page.click(f"a[href='/jobs/{job}']")
        page.wait_for_selector("#summary .state-running", timeout=120_000)

        def step() -> int:
            text = page.inner_text("#summary")
            return int(text.split("step ")[1].split("/")[0])

        first = _wait(step, 60, "the first progress")
        _wait(lambda: step() > first, 60, "progress to advance")
        _wait(lambda: int(page.get_attribute("#loss", "data-points") or 0) >= 2, 90, "loss chart")
        _wait(lambda: "step " in page.inner_text("#log"), 30, "the log")
        page.screenshot(path=str(ARTIFACTS / "job-running.png"), full_page=True)

        page.click("#cancel")
        page.wait_for_selector("#summary .state-cancelled", timeout=120_000)
        page.screenshot(path=str(ARTIFACTS / "job-cancelled.png"), full_page=True)
        events = page.inner_text("#events")
        assert "cancel" in events and "(acme, member)" in events

        # Another owner's job page is a page about nothing: the API answers 404.
        page.goto(f"{server.url}/jobs/{theirs}")
        # A locator wait, not wait_for_function: the page's CSP forbids the eval that needs.
        expect(page.locator("#summary")).to_have_text("No such job.", timeout=30_000)
        browser.close()

    with server.http(acme) as c:
        assert c.get(f"/v1/jobs/{job}").json()["state"] == "cancelled"
    with server.http(globex) as c:
        c.post(f"/v1/jobs/{theirs}/cancel")
        assert json.loads(c.get(f"/v1/jobs/{theirs}").text)["owner"] == "globex"
