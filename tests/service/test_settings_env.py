"""Settings from flags and LOWDIFF_* environment variables: the flag wins, errors name their source."""

from __future__ import annotations

import pytest

from lowdiff.service.settings import SettingsError, resolve_settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_settings_from_flags_and_environment() -> None:
    import argparse

    from lowdiff.service.settings import add_serve_arguments

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    env = {"LOWDIFF_MAX_BATCH": "16", "LOWDIFF_PORT": "9001", "LOWDIFF_API_KEY": "k", "LOWDIFF_MAX_DELAY_MS": "2.5"}
    s = resolve_settings(parser.parse_args(["--port", "9002"]), env)
    assert (s.max_batch, s.port, s.api_key, s.max_delay_ms) == (16, 9002, "k", 2.5)  # the flag wins
    with pytest.raises(SettingsError, match=r"^LOWDIFF_MAX_BATCH: must be ≥ 1"):
        resolve_settings(parser.parse_args([]), {"LOWDIFF_MAX_BATCH": "0"})
    with pytest.raises(SettingsError, match=r"^--max-queue"):
        resolve_settings(parser.parse_args(["--max-batch", "64", "--max-queue", "8"]), {})
    with pytest.raises(SettingsError, match=r"^--engine: unknown engine"):
        resolve_settings(parser.parse_args(["--engine", "warp-drive"]), {})
    with pytest.raises(SettingsError, match=r"^LOWDIFF_PORT: invalid value"):
        resolve_settings(parser.parse_args([]), {"LOWDIFF_PORT": "http"})
