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


def setup_logging(service: str) -> logging.Logger:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("LOG_LEVEL", "INFO").upper())
    # Client libraries log request URLs and payload fragments at DEBUG.
    for noisy in ("aiokafka", "kafka", "urllib3", "pymongo", "hvac", "grpc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return logging.getLogger(f"dicomsafe.{service}")
