"""Shared test setup. Real services are started by the plugins below, on 127.0.0.1, by PID."""

import os

# Nothing may come from a model hub; Ray stays on loopback and reports nothing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = [
    "tests.plugins.postgres",
    "tests.plugins.seaweed",
    "tests.plugins.models",
    "tests.plugins.cluster",
    "tests.plugins.service",
    "tests.plugins.mlflow",
]


def pytest_sessionfinish(session, exitstatus):  # type: ignore[no-untyped-def]
    """In CI a skipped test is a failure: a test that needs PostgreSQL, SeaweedFS or Ray must
    not pass unnoticed because the service was missing. Set LORAJOBS_ALLOW_SKIPS=1 to run a
    subset locally without this rule."""
    if os.environ.get("CI") != "true" or os.environ.get("LORAJOBS_ALLOW_SKIPS") == "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped and exitstatus == 0:
        for rep in skipped:
            reporter.write_line(f"SKIPPED IN CI (a failure here): {rep.nodeid}: {rep.longrepr}")
        session.exitstatus = 1
