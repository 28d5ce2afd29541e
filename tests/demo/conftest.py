"""The demo run the slow tests share; only `slow` tests may run the demo, so `-m "not slow"` stays quick."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.demo.runs import demo


@pytest.fixture(scope="session")
def first_run(tmp_path_factory) -> tuple[Path, str]:
    """One quick demo run and its output, for reading only (``runs.own_copy`` before running the demo again)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    return out, demo(out)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "first_run" in getattr(item, "fixturenames", ()) and item.get_closest_marker("slow") is None:
            raise pytest.UsageError(f"{item.nodeid} runs the demo (the first_run fixture) but is not marked slow")
