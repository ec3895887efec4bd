"""Fixtures for pyvirt.oci: the busybox test image (pyvirt.testing.oci) and a private blob cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvirt.testing import oci as t


@pytest.fixture(scope="session")
def busybox_layers() -> list[bytes]:
    return t.busybox_layers(t.busybox_binary())


@pytest.fixture(scope="session")
def busybox_config(busybox_layers: list[bytes]) -> dict:
    return t.image_config(busybox_layers, **t.BUSYBOX_CONFIG)


@pytest.fixture
def oci_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh PYVIRT_OCI_CACHE for this test."""
    root = tmp_path / "oci-cache"
    monkeypatch.setenv("PYVIRT_OCI_CACHE", str(root))
    return root
