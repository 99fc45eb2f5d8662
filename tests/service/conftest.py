"""Fixtures for the service tests: PNG decoding, an app on a live loopback server, a shared server and client."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from lowdiff.service.app import create_app
from lowdiff.service.settings import ServeSettings


def png_pixels(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.fixture(scope="session")
def decode_png() -> Callable[[bytes], np.ndarray]:
    """``decode_png(data)`` → the pixels of PNG bytes (asserts the PNG signature)."""
    return png_pixels


@pytest.fixture(scope="session")
def live(live_server, fake_engine):
    """``live(engine=None, **settings)`` → a LiveServer for create_app(ServeSettings(**settings), engine)
    (a fresh FakeEngine when engine is None); use as a context manager."""

    def make(engine=None, **settings: object):
        return live_server(create_app(ServeSettings(**settings), engine=engine or fake_engine()))

    return make


@pytest.fixture(scope="module")
def server(live):
    """One ready server (FakeEngine) per test module."""
    with live(max_queue=128, timeout_s=30) as srv:
        srv.wait_ready()
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c
