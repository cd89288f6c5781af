"""Structured JSON logs on stderr.

Log records carry identifiers (object ids, UIDs, offsets) but never patient
demographics, pixel data or key material: callers pass only such fields as ``extra``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                doc[key] = value if isinstance(value, (str, int, float, bool)) else str(value)
        if record.exc_info and record.exc_info[0] is not None:
            # Type only: exception messages from third-party libraries may quote payloads.
            doc["exc_type"] = record.exc_info[0].__name__
        return json.dumps(doc, separators=(",", ":"))


# Client libraries whose retry loops log: held to one line per distinct message per window.
_LIBRARIES = ("aiokafka", "kafka", "urllib3", "pymongo", "hvac", "grpc")


class RepeatLimiter(logging.Filter):
    """A client library retrying against a server that is down logs the same line every few
    milliseconds: aiokafka wrote 44,000 lines in crypto's log during a 7-second Kafka restart,
    which buries what matters and fills a node's disk in a long outage. Each distinct line of
    a library passes at most once per ``window_s``; the first one after a window says how many
    were held back (``repeated``). The project's own lines always pass."""

    def __init__(self, window_s: float = 10.0, libraries: tuple[str, ...] = _LIBRARIES) -> None:
        super().__init__()
        self._window = window_s
        self._libraries = libraries
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self._libraries):
            return True
        key = (record.name, record.levelno, record.getMessage())
        now = time.monotonic()
        since, held = self._seen.get(key, (-self._window, 0))
        if now - since < self._window:
            self._seen[key] = (since, held + 1)
            return False
        if held:
            record.repeated = held
        if len(self._seen) > 1000:  # bounded: distinct messages (ports, node ids) come and go
            self._seen.clear()
        self._seen[key] = (now, 0)
        return True


def setup_logging(service: str) -> logging.Logger:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    handler.addFilter(RepeatLimiter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("LOG_LEVEL", "INFO").upper())
    # Client libraries log request URLs and payload fragments at DEBUG.
    for noisy in _LIBRARIES:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return logging.getLogger(f"dicomsafe.{service}")
