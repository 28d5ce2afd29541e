"""Only `slow` tests may run the demo: `-m "not slow"` stays quick."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "first_run" in getattr(item, "fixturenames", ()) and item.get_closest_marker("slow") is None:
            raise pytest.UsageError(f"{item.nodeid} runs the demo (the first_run fixture) but is not marked slow")
