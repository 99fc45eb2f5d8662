"""``lowdiff serve`` settings (flags over LOWDIFF_* variables over defaults) and the JSON log lines."""

from __future__ import annotations

import argparse
import io
import json
import logging
import re

import pytest

from lowdiff.errors import LowDiffError
from lowdiff.service.logs import JsonFormatter, request_id_var
from lowdiff.service.settings import (
    ENGINE_KINDS,
    ServeSettings,
    SettingsError,
    add_serve_arguments,
    resolve_settings,
    settings_dict,
)


@pytest.fixture
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowdiff serve")
    add_serve_arguments(p)
    return p


def resolve(parser: argparse.ArgumentParser, argv: list[str], env: dict[str, str]) -> ServeSettings:
    return resolve_settings(parser.parse_args(argv), env)


# ---------------------------------------------------------------------------- precedence
def test_flag_beats_env_beats_default(parser) -> None:
    env = {
        "LOWDIFF_PORT": "9001",
        "LOWDIFF_MAX_BATCH": "16",
        "LOWDIFF_MAX_DELAY_MS": "2.5",
        "LOWDIFF_CHECKPOINT": "/m.pt",
    }
    s = resolve(parser, ["--port", "9002"], env)
    assert s.port == 9002  # flag over variable
    assert (s.max_batch, s.max_delay_ms, str(s.checkpoint)) == (16, 2.5, "/m.pt")  # variables over defaults
    assert (s.host, s.engine, s.max_queue) == ("127.0.0.1", "torch", 1024)  # defaults
    assert resolve(parser, [], {}) == ServeSettings()
    assert resolve(parser, [], {"LOWDIFF_HOST": ""}).host == "127.0.0.1"  # an empty variable is unset


def test_given_environ_replaces_os_environ(parser, monkeypatch) -> None:
    monkeypatch.setenv("LOWDIFF_MAX_BATCH", "3")
    assert resolve(parser, [], {}).max_batch == 64
    assert resolve_settings(parser.parse_args([])).max_batch == 3  # environ=None reads os.environ
    assert ServeSettings().max_batch == 64  # direct construction reads no environment


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--max-batch", "0"], {}, "--max-batch: must be ≥ 1, got 0"),
        ([], {"LOWDIFF_MAX_BATCH": "0"}, "LOWDIFF_MAX_BATCH: must be ≥ 1, got 0"),
        (["--max-batch", "2"], {"LOWDIFF_MAX_BATCH": "0"}, None),  # the bad variable is overridden
        (["--port", "65536"], {}, "--port: must be in 0…65535, got 65536"),
        ([], {"LOWDIFF_PORT": "-1"}, "LOWDIFF_PORT: must be in 0…65535, got -1"),
        ([], {"LOWDIFF_PORT": "http"}, "LOWDIFF_PORT: invalid value 'http' (expected an integer)"),
        (["--max-delay-ms", "-1"], {}, "--max-delay-ms: must be ≥ 0, got -1"),
        (["--max-delay-ms", "nan"], {}, "--max-delay-ms: must be ≥ 0, got nan"),
        (["--timeout-s", "0"], {}, "--timeout-s: must be > 0, got 0"),
        ([], {"LOWDIFF_GRACE_S": "soon"}, "LOWDIFF_GRACE_S: invalid value 'soon' (expected a number)"),
        (["--threads", "-2"], {}, "--threads: must be ≥ 0, got -2"),
        (["--device", "tpu"], {}, "--device: expected one of cpu, cuda, got 'tpu'"),
        (
            [],
            {"LOWDIFF_LOG_LEVEL": "loud"},
            "LOWDIFF_LOG_LEVEL: expected one of debug, info, warning, error, got 'loud'",
        ),
        (
            ["--engine", "warp-drive"],
            {},
            "--engine: unknown engine 'warp-drive'; available: torch, cudagraph, onnxruntime, tensorrt",
        ),
        # cross-field checks (ServeSettings.validate) name the variable too when the value came from one
        (["--max-queue", "8"], {}, "--max-queue: must be ≥ --max-batch (64), got 8"),
        ([], {"LOWDIFF_MAX_QUEUE": "8"}, "LOWDIFF_MAX_QUEUE: must be ≥ --max-batch (64), got 8"),
        (["--timeout-s", "10", "--max-timeout-s", "5"], {}, "--timeout-s: must be ≤ --max-timeout-s (5), got 10"),
        (["--warmup-batch", "9", "--max-batch", "8"], {}, "--warmup-batch: must be ≤ --max-batch (8), got 9"),
        (["--checkpoint", "a.pt", "--config", "fashion32"], {}, "--config: give either --checkpoint or --config"),
    ],
)
def test_bad_values_name_their_source(parser, argv, env, message) -> None:
    if message is None:
        resolve(parser, argv, env)
        return
    with pytest.raises(SettingsError) as caught:
        resolve(parser, argv, env)
    error = caught.value
    assert str(error).startswith(message)
    assert "\n" not in str(error) and "pydantic" not in str(error)  # one line, our words
    assert isinstance(error, LowDiffError)
    assert error.field is not None and re.fullmatch(r"[a-z_]+", error.field)
    source = message.split(":")[0]
    assert source in (f"--{error.field.replace('_', '-')}", f"LOWDIFF_{error.field.upper()}")


def test_settings_error_is_the_shared_one() -> None:
    import lowdiff.errors

    assert SettingsError is lowdiff.errors.SettingsError


# ---------------------------------------------------------------------------- api key
def test_api_key_from_environment_only(parser, capsys) -> None:
    assert resolve(parser, [], {"LOWDIFF_API_KEY": "s3cret"}).api_key == "s3cret"
    for empty in ("", "  "):  # an empty key would silently switch auth off: refused
        with pytest.raises(SettingsError, match=r"^LOWDIFF_API_KEY: set but empty") as caught:
            resolve(parser, [], {"LOWDIFF_API_KEY": empty})
        assert caught.value.field == "api_key"
    assert resolve(parser, [], {}).api_key is None
    assert "--api-key" not in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--api-key", "s3cret"])
    capsys.readouterr()


def test_settings_dict_hides_the_api_key(parser) -> None:
    s = resolve(parser, ["--engine-dir", "/engines"], {"LOWDIFF_API_KEY": "s3cret"})
    shown = settings_dict(s)
    assert "api_key" not in shown and "s3cret" not in json.dumps(shown) and "s3cret" not in repr(s)
    assert shown["engine_dir"] == "/engines" and shown["max_batch"] == 64
    assert set(shown) == set(ServeSettings.model_fields) - {"api_key"}


# ---------------------------------------------------------------------------- help
def test_help_lists_engines_variables_and_defaults(parser) -> None:
    text = " ".join(parser.format_help().split())
    for kind in ENGINE_KINDS:
        assert kind in text
    assert "env LOWDIFF_MAX_BATCH; default 64" in text
    assert "fp16 is CUDA only" in text and "fp32 only" not in text
    for name in ServeSettings.model_fields:
        if name != "api_key":
            assert f"--{name.replace('_', '-')}" in text


def test_engine_names_match_the_engines_package() -> None:
    from lowdiff.engines import ENGINE_KINDS as REGISTERED

    assert tuple(ENGINE_KINDS) == tuple(REGISTERED)


# ---------------------------------------------------------------------------- logs
def log_line(logger_name: str, emit) -> dict:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(logger_name)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        emit(logger)
    finally:
        logger.handlers[:] = []
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def test_json_log_line_has_the_keys() -> None:
    token = request_id_var.set("req-42")
    try:
        entry = log_line("lowdiff.test", lambda log: log.info("served %d images", 3, extra={"images": 3, "ms": 1.5}))
    finally:
        request_id_var.reset(token)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["ts"])
    assert entry["level"] == "info" and entry["logger"] == "lowdiff.test" and entry["msg"] == "served 3 images"
    assert entry["request_id"] == "req-42"
    assert (entry["images"], entry["ms"]) == (3, 1.5)
    assert "exc" not in entry
    assert set(entry) == {"ts", "level", "logger", "msg", "request_id", "images", "ms"}  # no LogRecord internals


def test_json_log_line_without_request_with_exception() -> None:
    def emit(log: logging.Logger) -> None:
        try:
            raise RuntimeError("boom ü")
        except RuntimeError:
            log.exception("failed", extra={"settings": {"port": 1}})

    entry = log_line("lowdiff.test", emit)
    assert entry["level"] == "error" and entry["msg"] == "failed" and entry["settings"] == {"port": 1}
    assert "request_id" not in entry
    assert "Traceback" in entry["exc"] and "RuntimeError: boom ü" in entry["exc"]
