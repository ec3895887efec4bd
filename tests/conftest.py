"""The whole suite: on a slower engine (`PYVIRT_ENGINE=jit make test`) every test's time limit
grows as its guest work does (`pyvirt.testing.stretch`); the deadlines inside the tests go
through the same factor (pyvirt.testing.guest and .daemon)."""

from __future__ import annotations

import pytest

from pyvirt.testing import stretch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if stretch(1.0) == 1.0:
        return
    default = float(config.getini("timeout") or 0)
    for item in items:
        marker = item.get_closest_marker("timeout")
        limit = float(marker.args[0]) if marker is not None and marker.args else default
        if limit:
            item.add_marker(pytest.mark.timeout(stretch(limit)), append=False)   # (before any own)
