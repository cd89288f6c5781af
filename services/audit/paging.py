"""Query filters and page tokens for the audit trail.

Records are returned in recorded order with ties broken by (chain, seq): a total order, since
(chain, seq) is unique, so a page token that names the last record returned — its
(recorded_at, chain, seq) — lets the next page start exactly after it, whatever was appended
meanwhile. The token also carries a fingerprint of the filters, so a token is refused with
other filters instead of silently paging a different result.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

MAX_LIMIT = 10_000
MAX_PAGE_SIZE = 1_000
DEFAULT_PAGE_SIZE = 100
# The order every query returns records in; each filter index ends with it (store.py).
ORDER = [("recorded_at", 1), ("chain", 1), ("seq", 1)]
# Index name -> the filtered field in front of ORDER ("" = the time index alone), most
# selective first: a query walks the first whose field it filters on.
ORDERED_INDEXES = {
    "object_order": "event.object_id",
    "patient_order": "event.patient_ref",
    "study_order": "event.study_instance_uid",
    "actor_order": "event.actor",
    "recorded_order": "",
}


class BadPageToken(ValueError):
    """The token is not one this service issued for these filters."""


@dataclass(frozen=True)
class Filters:
    patient_ref: str = ""
    study_instance_uid: str = ""
    actor: str = ""
    object_id: str = ""
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    # Enum names as stored (e.g. "AUDIT_ACTION_INSTANCE_RETRIEVED"); empty = any.
    actions: Sequence[str] = field(default_factory=tuple)
    outcomes: Sequence[str] = field(default_factory=tuple)

    def mongo(self) -> dict[str, Any]:
        flt: dict[str, Any] = {}
        for key, value in (
            ("event.patient_ref", self.patient_ref),
            ("event.study_instance_uid", self.study_instance_uid),
            ("event.actor", self.actor),
            ("event.object_id", self.object_id),
        ):
            if value:
                flt[key] = value
        if self.since or self.until:
            flt["recorded_at"] = {k: v for k, v in (("$gte", self.since), ("$lt", self.until)) if v}
        # Residual predicates on the index walk the other filters choose (see store.py).
        if self.actions:
            flt["event.action"] = {"$in": sorted(set(self.actions))}
        if self.outcomes:
            flt["event.outcome"] = {"$in": sorted(set(self.outcomes))}
        return flt

    def index(self) -> str:
        """The index to walk, named to the server (a hint): some planners, the local SecantusDB
        among them, fall back to a collection scan as soon as a predicate (action, outcome, the
        page position's $or) is not in the index, although the walk plus a filter is cheaper."""
        chosen = {
            "event.object_id": self.object_id,
            "event.patient_ref": self.patient_ref,
            "event.study_instance_uid": self.study_instance_uid,
            "event.actor": self.actor,
        }
        return next((name for name, field in ORDERED_INDEXES.items() if field and chosen[field]), "recorded_order")

    def fingerprint(self) -> str:
        canonical = {
            "p": self.patient_ref,
            "s": self.study_instance_uid,
            "a": self.actor,
            "o": self.object_id,
            "f": _ms(self.since) if self.since else None,
            "u": _ms(self.until) if self.until else None,
            "x": sorted(set(self.actions)),
            "y": sorted(set(self.outcomes)),
        }
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Position:
    """The last record of a page: (recorded_at in ms, chain, seq)."""

    recorded_ms: int
    chain: str
    seq: int

    def continue_after(self, flt: dict[str, Any]) -> dict[str, Any]:
        """``flt`` narrowed to the records strictly after this position in ORDER. The bound on
        recorded_at starts the index walk at the position; the $or only sorts out the records
        recorded in the same millisecond. One flat conjunction (no $and), so a planner sees the
        equality and the range side by side."""
        at = dt.datetime.fromtimestamp(self.recorded_ms / 1000, dt.UTC)
        narrowed = dict(flt)
        bounds = dict(narrowed.get("recorded_at", {}))
        since = bounds.get("$gte")
        if since is None or _ms(since) < self.recorded_ms:
            bounds["$gte"] = at
        narrowed["recorded_at"] = bounds
        narrowed["$or"] = [
            {"recorded_at": {"$gt": at}},
            {"chain": {"$gt": self.chain}},
            {"chain": self.chain, "seq": {"$gt": self.seq}},
        ]
        return narrowed


def _ms(when: dt.datetime) -> int:
    """Milliseconds since the epoch, exactly (BSON dates are whole milliseconds, naive = UTC)."""
    aware = when if when.tzinfo else when.replace(tzinfo=dt.UTC)
    delta = aware - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def encode_token(position: Position, filters: Filters) -> str:
    body = {"t": position.recorded_ms, "c": position.chain, "s": position.seq, "f": filters.fingerprint()}
    raw = json.dumps(body, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, filters: Filters) -> Position:
    try:
        body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        position = Position(int(body["t"]), str(body["c"]), int(body["s"]))
        fingerprint = str(body["f"])
    except (binascii.Error, ValueError, TypeError, KeyError, UnicodeDecodeError):
        raise BadPageToken("page token malformed") from None
    if fingerprint != filters.fingerprint():
        raise BadPageToken("page token belongs to a query with other filters")
    return position


def position_of(recorded_at: dt.datetime, chain: str, seq: int) -> Position:
    return Position(_ms(recorded_at), chain, seq)
