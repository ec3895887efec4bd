"""Fixtures for tests that boot the default guest."""

from __future__ import annotations

import http.server
import os
import threading
from pathlib import Path

import pytest

from pyvirt.engines import ENGINES, native_available
from pyvirt.images import cached_default_image
from pyvirt.testing.guest import PtyConsole, Run, pyvirt

__all__ = ["PtyConsole", "Run", "pyvirt"]     # (also importable from pyvirt.testing.guest)


@pytest.fixture(scope="session")
def default_image():
    img = cached_default_image()
    if img is None:
        pytest.fail("the default image is not built: `make test` runs `pyvirt image build` first")
    return img


# Boots run on the native and jit engines, or on the ones PYVIRT_TEST_ENGINES (or PYVIRT_ENGINE)
# names.  A few boots (`every_engine`) run on the interp engine too, the reference tier: about
# 45 s each against about 1 s native, so that every engine boots Linux in every `make test`.
_FORCED = os.environ.get("PYVIRT_TEST_ENGINES") or os.environ.get("PYVIRT_ENGINE")
_AVAILABLE = [e for e in ENGINES if e != "native" or native_available()]
_ENGINES = _FORCED.split(",") if _FORCED else [e for e in _AVAILABLE if e != "interp"]
_EVERY = _FORCED.split(",") if _FORCED else _AVAILABLE


@pytest.fixture(params=_ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=_EVERY)
def every_engine(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def host_server(tmp_path: Path):
    """An HTTP server on the host's 127.0.0.1 serving tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, directory=str(www), **kw)

        def log_message(self, *a) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, server.server_address[1]
    server.shutdown()
    server.server_close()
