"""Service settings: one dataclass, filled from ``lowdiff serve`` flags, then ``LOWDIFF_*`` variables.

Every flag ``--some-flag`` has an environment variable ``LOWDIFF_SOME_FLAG`` (containers are
configured by environment); a flag given on the command line wins over the variable. A bad value
names the flag or the variable it came from.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "LOWDIFF_"
API_KEY_ENV = "LOWDIFF_API_KEY"


class SettingsError(ValueError):
    """A flag or environment variable with a bad value; the message names it."""


@dataclass
class ServeSettings:
    checkpoint: Path | None = None
    config: str | None = None
    engine_dir: Path | None = None
    engine: str = "torch"
    device: str = "cpu"
    precision: str = "fp32"
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 64
    max_delay_ms: float = 10.0
    max_queue: int = 1024
    timeout_s: float = 120.0
    max_timeout_s: float = 3600.0
    grace_s: float = 30.0
    warmup_batch: int = 1
    threads: int = 0
    max_body_bytes: int = 16384
    log_level: str = "info"
    api_key: str | None = None

    def validate(self) -> None:
        if self.checkpoint is not None and self.config is not None:
            raise SettingsError("--config: give either --checkpoint or --config (random weights), not both")
        if self.max_queue < self.max_batch:
            raise SettingsError(f"--max-queue: must be ≥ --max-batch ({self.max_batch}), got {self.max_queue}")
        if self.timeout_s > self.max_timeout_s:
            raise SettingsError(f"--timeout-s: must be ≤ --max-timeout-s ({self.max_timeout_s}), got {self.timeout_s}")
        if self.warmup_batch > self.max_batch:
            raise SettingsError(f"--warmup-batch: must be ≤ --max-batch ({self.max_batch}), got {self.warmup_batch}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be ≥ 1, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"must be ≥ 0, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"must be in 0…65535, got {value}")
    return value


def _nonnegative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"must be ≥ 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _nonnegative_float(text)
    if value == 0:
        raise ValueError("must be > 0")
    return value


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {text!r}")
        return text

    return parse


def _engine_kinds() -> tuple[str, ...]:
    from engines import ENGINE_KINDS

    return tuple(ENGINE_KINDS)


# name → (parser, help). Parsers raise ValueError with a message that completes "--flag: ...".
OPTIONS: dict[str, tuple[Callable[[str], Any], str]] = {
    "checkpoint": (Path, "model checkpoint (default: the embedded fashion32 model)"),
    "config": (str, "serve a built-in config with random, untrained weights (testing and load tests only)"),
    "engine_dir": (Path, "folder of exported engines (passed to the engine loader)"),
    "engine": (str, "runtime that executes the cascade (see engines.ENGINE_KINDS)"),
    "device": (_choice("cpu", "cuda"), "cpu or cuda"),
    "precision": (_choice("fp32", "bf16", "fp16"), "compute precision (CPU runs fp32 only)"),
    "host": (str, "address to bind (default loopback; 0.0.0.0 in a container)"),
    "port": (_port, "TCP port (0 = any free port)"),
    "max_batch": (_positive_int, "most images in one engine batch"),
    "max_delay_ms": (_nonnegative_float, "longest wait for a batch to fill, from its oldest image's arrival"),
    "max_queue": (_positive_int, "most queued (not yet started) images; past it new requests get 429"),
    "timeout_s": (_positive_float, "default per-request deadline (a request may set timeout_s itself)"),
    "max_timeout_s": (_positive_float, "largest timeout_s a request may ask for"),
    "grace_s": (_nonnegative_float, "on SIGTERM, how long in-flight requests may take to finish"),
    "warmup_batch": (_positive_int, "images in the warm-up batch run before /readyz turns 200"),
    "threads": (_nonnegative_int, "torch intra-op threads (0 = torch's default)"),
    "max_body_bytes": (_positive_int, "largest accepted request body"),
    "log_level": (_choice("debug", "info", "warning", "error"), "log level"),
}


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags with default None, so that :func:`resolve_settings` can tell 'not given' from a value."""
    defaults = ServeSettings()
    for name, (_, help_text) in OPTIONS.items():
        default = getattr(defaults, name)
        shown = f", default {default}" if default is not None else ""
        parser.add_argument(flag_name(name), default=None, help=f"{help_text} (env {env_name(name)}{shown})")


def resolve_settings(args: argparse.Namespace | None, environ: Mapping[str, str] | None = None) -> ServeSettings:
    """Command line, else environment, else the dataclass default; raises :class:`SettingsError`."""
    environ = os.environ if environ is None else environ
    settings = ServeSettings()
    for name, (parse, _) in OPTIONS.items():
        raw = getattr(args, name, None) if args is not None else None
        source = flag_name(name)
        if raw is None and environ.get(env_name(name), "") != "":
            raw, source = environ[env_name(name)], env_name(name)
        if raw is None:
            continue
        try:
            value = parse(raw)
        except ValueError as exc:
            message = str(exc) if "must" in str(exc) or "expected" in str(exc) else f"invalid value {raw!r}"
            raise SettingsError(f"{source}: {message}") from None
        setattr(settings, name, value)
    if settings.engine not in _engine_kinds():
        raise SettingsError(f"--engine: unknown engine {settings.engine!r}; available: {', '.join(_engine_kinds())}")
    settings.api_key = environ.get(API_KEY_ENV) or None
    settings.validate()
    return settings


def settings_dict(settings: ServeSettings) -> dict[str, Any]:
    """For logs and /info: everything but the API key."""
    out: dict[str, Any] = {}
    for f in fields(settings):
        if f.name == "api_key":
            continue
        value = getattr(settings, f.name)
        out[f.name] = str(value) if isinstance(value, Path) else value
    return out
