"""Structured logs: one JSON object per line on stderr (or plain text for people).

Call `log(logger, "event_name", key=value, ...)`; the event name and fields
become top-level keys, so logs can be filtered with jq or a log pipeline.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in getattr(record, "fields", {}).items())
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp} {record.levelname[0]} {record.name}: {record.getMessage()} {fields}".rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def add_logging_arguments(p: argparse.ArgumentParser) -> None:
    """--log-format and --log-level (for setup_logging), as every long-running command takes them."""
    p.add_argument("--log-format", choices=["json", "text"], default="json",
                   help="json: one JSON object per line on stderr (default); text: for people")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="the least severe level that is logged (default: info)")


def setup_logging(fmt: str = "json", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("understudy")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def log(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    logger.log(level, event, extra={"fields": fields})
