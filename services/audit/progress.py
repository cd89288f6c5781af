"""A progress bar on stderr for long verifications (a million records takes a while)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

_WIDTH = 30
# Redrawing is cheap, but not free: at most this often.
_REDRAW_S = 0.2


class ProgressBar:
    def __init__(self, total: int, out: TextIO = sys.stderr, label: str = "verifying") -> None:
        self._total = max(total, 0)
        self._out = out
        self._label = label
        self._done = 0
        self._started = time.monotonic()
        self._drawn_at = 0.0

    def advance(self, records: int) -> None:
        self._done += records
        now = time.monotonic()
        if now - self._drawn_at >= _REDRAW_S:
            self._drawn_at = now
            self._draw(now)

    def finish(self) -> None:
        self._draw(time.monotonic())
        self._out.write("\n")
        self._out.flush()

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._started, 1e-9)
        rate = self._done / elapsed
        # The total is the collection's estimated count: the bar never runs past full.
        total = max(self._total, self._done)
        share = self._done / total if total else 1.0
        filled = int(share * _WIDTH)
        eta = f"{(total - self._done) / rate:5.0f}s left" if rate > 0 and self._done < total else ""
        self._out.write(
            f"\r{self._label} [{'#' * filled}{'.' * (_WIDTH - filled)}] {share:4.0%} "
            f"{self._done:,}/{total:,} records {rate:,.0f}/s {eta}"
        )
        self._out.flush()
