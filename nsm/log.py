"""Structured logging: ``key=value`` (default) or JSON lines, one event per line.

Use ``log = get_logger(__name__)`` then ``log.info("connection up", conn_id=..., ifname=...)``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


class _Formatter(logging.Formatter):
    def __init__(self, json_lines: bool) -> None:
        super().__init__()
        self.json_lines = json_lines

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ts += f".{int(record.msecs):03d}Z"
        if self.json_lines:
            doc = {"ts": ts, "level": record.levelname.lower(), "logger": record.name,
                   "msg": record.getMessage(), **fields}
            if record.exc_info:
                doc["exc"] = self.formatException(record.exc_info)
            return json.dumps(doc, default=str)
        kv = " ".join(f"{k}={_quote(v)}" for k, v in fields.items())
        line = f"{ts} {record.levelname.lower():5} {record.name} {record.getMessage()!r}"
        line = f"{line} {kv}" if kv else line
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (not text or any(c in text for c in ' "=')) else text


class Logger:
    """A thin structured wrapper over :mod:`logging`."""

    def __init__(self, name: str, /, **bound: Any) -> None:
        self._log = logging.getLogger(name)
        self._bound = bound

    def bind(self, **fields: Any) -> Logger:
        return Logger(self._log.name, **{**self._bound, **fields})

    def _emit(self, level: int, msg: str, exc_info: bool, fields: dict[str, Any]) -> None:
        if self._log.isEnabledFor(level):
            self._log.log(level, msg, exc_info=exc_info,
                          extra={"fields": {**self._bound, **fields}})

    def debug(self, msg: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, msg, False, fields)

    def info(self, msg: str, **fields: Any) -> None:
        self._emit(logging.INFO, msg, False, fields)

    def warning(self, msg: str, **fields: Any) -> None:
        self._emit(logging.WARNING, msg, False, fields)

    def error(self, msg: str, exc_info: bool = False, **fields: Any) -> None:
        self._emit(logging.ERROR, msg, exc_info, fields)


def get_logger(name: str, /, **bound: Any) -> Logger:
    return Logger(name, **bound)


def setup(level: str = "info", json_lines: bool = False) -> None:
    """Configure the root logger for a daemon (stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(json_lines))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
