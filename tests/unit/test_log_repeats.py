"""A client library's retry loop cannot flood the log: each distinct line once per window."""

from __future__ import annotations

import io
import json
import logging
import time

from dicomsafe.common.logs import JsonFormatter, RepeatLimiter


def _logger(window_s: float) -> tuple[io.StringIO, logging.Logger, logging.Logger]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("test"))
    handler.addFilter(RepeatLimiter(window_s=window_s))
    library, ours = logging.getLogger("aiokafka.test-repeats"), logging.getLogger("dicomsafe.test-repeats")
    for logger in (library, ours):
        logger.handlers[:] = [handler]
        logger.propagate = False
    return out, library, ours


def _lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_library_line_repeated_in_a_retry_loop_passes_once_per_window() -> None:
    out, library, ours = _logger(window_s=0.3)
    for _ in range(500):
        library.error("Unable connect to node with id 1")
    library.error("Unable to update metadata from [1]")  # another line: passes
    for _ in range(3):
        ours.warning("instance stored")  # the project's own lines are never held back
    lines = _lines(out)
    assert [line["msg"] for line in lines] == [
        "Unable connect to node with id 1",
        "Unable to update metadata from [1]",
        "instance stored",
        "instance stored",
        "instance stored",
    ]
    time.sleep(0.35)
    library.error("Unable connect to node with id 1")
    after = _lines(out)[-1]
    # The first line after the window says how many were held back.
    assert after["msg"] == "Unable connect to node with id 1" and after["repeated"] == 499
