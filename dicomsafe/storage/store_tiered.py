"""Two tiers behind one store: ``hot`` (recent images, fast storage) and ``archive`` (older ones,
long-term retention, e.g. another bucket with Object Lock). New objects go to the hot tier;
reads find an object in either, hot first, so a retrieval from the archive is transparent to
every caller. The tiering job (``tools.tiering``) moves sealed bytes from hot to archive; it
never decrypts, and drops the hot copy only after the archive holds the same bytes.

A rewrap of an archived object writes its new header through ``begin_write``: the object comes
back to the hot tier (the archive copy stays as it was, and is moved again by the next run).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterator
from typing import BinaryIO

from prometheus_client import Histogram

from dicomsafe.storage.object_store import ObjectStore, PendingObject

# How long opening an object takes per tier: the archive's latency, as callers see it.
TIER_OPEN_SECONDS = Histogram(
    "dicomsafe_crypto_store_open_seconds", "Time to open a stored object for reading, by tier", ["tier"]
)


class TieredStore:
    def __init__(self, hot: ObjectStore, archive: ObjectStore) -> None:
        self.hot, self.archive = hot, archive
        self.reads_block = hot.reads_block or archive.reads_block

    def describe_location(self) -> str:
        return f"hot {self.hot.describe_location()}, archive {self.archive.describe_location()}"

    def exists(self, object_id: str) -> bool:
        return self.hot.exists(object_id) or self.archive.exists(object_id)

    def claim(self, sop_instance_uid: str, object_id: str) -> str:
        return self.hot.claim(sop_instance_uid, object_id)

    def open_read(self, object_id: str) -> BinaryIO:
        started = time.perf_counter()
        try:
            f = self.hot.open_read(object_id)
            tier = "hot"
        except FileNotFoundError:
            f = self.archive.open_read(object_id)
            tier = "archive"
        TIER_OPEN_SECONDS.labels(tier).observe(time.perf_counter() - started)
        return f

    def tier_of(self, object_id: str) -> str:
        """ "hot", "archive", or "" when neither holds it."""
        if self.hot.exists(object_id):
            return "hot"
        return "archive" if self.archive.exists(object_id) else ""

    def begin_write(self, object_id: str, *, replace: bool = False) -> PendingObject:
        return self.hot.begin_write(object_id, replace=replace)

    def object_ids(self) -> Iterator[str]:
        """Each id once, in id order (both tiers list in id order)."""
        last = None
        for object_id in heapq.merge(self.hot.object_ids(), self.archive.object_ids()):
            if object_id != last:
                yield object_id
            last = object_id

    def remove_leftovers(self) -> int:
        return self.hot.remove_leftovers() + self.archive.remove_leftovers()
