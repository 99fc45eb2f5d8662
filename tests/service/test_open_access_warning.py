"""Serving without a key where others can reach the server is logged as a warning."""

from __future__ import annotations

import logging

import pytest

from lowdiff.service.server import warn_if_open
from lowdiff.service.settings import ServeSettings


def warnings_for(caplog: pytest.LogCaptureFixture, host: str, api_key: str | None = None) -> list[str]:
    settings = ServeSettings(host=host)
    settings.api_key = api_key
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lowdiff.service"):
        warn_if_open(settings)
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "lowdiff.example.com"])
def test_no_key_on_a_reachable_address_warns(caplog, host: str) -> None:
    (message,) = warnings_for(caplog, host)
    assert f"serving without an API key on {host}" in message
    assert "LOWDIFF_API_KEY" in message


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_does_not_warn(caplog, host: str) -> None:
    assert warnings_for(caplog, host) == []


def test_a_key_does_not_warn(caplog) -> None:
    assert warnings_for(caplog, "0.0.0.0", api_key="s3cret") == []
