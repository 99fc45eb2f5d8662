"""Structured logs: one JSON object per line, with the request id of the request being served.

A line holds ``ts`` (ISO-8601 UTC with milliseconds and ``Z``), ``level`` (lower case), ``logger``,
``msg``, ``request_id`` while a request is being served, every ``extra={…}`` field as a top-level
key, and ``exc`` (the formatted traceback) when an exception is logged. The formatting is
python-json-logger's; this module only names the keys.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from typing import Any

from pythonjsonlogger import json as jsonlogger
from pythonjsonlogger.core import RESERVED_ATTRS

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("lowdiff_request_id", default=None)


class JsonFormatter(jsonlogger.JsonFormatter):
    # logging.Formatter.formatTime with these: 2024-05-01T12:00:00.123Z
    converter = time.gmtime
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={
                "asctime": "ts",
                "levelname": "level",
                "name": "logger",
                "message": "msg",
                "exc_info": "exc",
            },
            # LogRecord attributes, whatever the Python version, and uvicorn's coloured copy of the message.
            reserved_attrs=[*RESERVED_ATTRS, "taskName", "color_message"],
            json_ensure_ascii=False,
        )

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        log_data["level"] = str(log_data["level"]).lower()
        request_id = request_id_var.get()
        if request_id is not None:
            log_data["request_id"] = request_id
        return log_data


def configure_logging(level: str = "info") -> None:
    """JSON lines on stderr for our loggers and uvicorn's (whose access log we replace with our own)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
