"""The hash chain: canonical form of a record and its verification. Pure functions.

Records of version 2 (written since 2026-11, field ``v: 2``):

    hash_n = SHA-256(bytes(prev_hash_n) || "dicomsafe/audit-record/v2" 0x00 || chain 0x00
                     || seq (8 bytes, big-endian) || recorded_at (ms since epoch, 8 bytes signed)
                     || BSON(event))

The event is stored as the JSON mapping of its protobuf (field names as in the .proto), and
its BSON bytes are hashed exactly as stored: MongoDB keeps a document's bytes (field order and
types), so verifying needs no decoding and no re-canonicalising — a hash over bytes straight
off the wire, which is what makes a million records verifiable in seconds. ``recorded_at`` is
covered, so the time that range queries, reports and breach lists filter on cannot be moved.

Records of version 1 (no ``v``) keep verifying with their own form:

    hash_n = SHA-256(bytes(prev_hash_n) || canonical_json({"chain", "seq", "event"}))

canonical JSON = sorted keys, no whitespace, UTF-8; their ``recorded_at`` is not covered.
Binding chain and seq into the hash stops a record from being moved to another position or chain.
"""

from __future__ import annotations

import calendar
import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import bson
from bson.datetime_ms import DatetimeMS
from bson.errors import BSONError
from bson.raw_bson import RawBSONDocument
from google.protobuf.json_format import MessageToDict

from dicomsafe.v1 import audit_pb2
from services.audit.bson_fields import string_field

GENESIS = "0" * 64
RECORD_VERSION = 2
_V2_DOMAIN = b"dicomsafe/audit-record/v2\x00"


@dataclass(frozen=True)
class Break:
    chain: str
    seq: int
    reason: str


def event_document(event: audit_pb2.AuditEvent) -> dict[str, Any]:
    return MessageToDict(event, preserving_proto_field_name=True)


def canonical(chain: str, seq: int, event: Mapping[str, Any]) -> bytes:
    body = {"chain": chain, "seq": seq, "event": event}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def link_hash(prev_hash: str, chain: str, seq: int, event: Mapping[str, Any]) -> str:
    """Version 1 (records without ``v``)."""
    return hashlib.sha256(bytes.fromhex(prev_hash) + canonical(chain, seq, event)).hexdigest()


def link_hash_v2(prev_hash: str, chain: str, seq: int, recorded_at_ms: int, event_bson: bytes) -> str:
    position = chain.encode() + b"\x00" + seq.to_bytes(8, "big") + recorded_at_ms.to_bytes(8, "big", signed=True)
    return hashlib.sha256(bytes.fromhex(prev_hash) + _V2_DOMAIN + position + event_bson).hexdigest()


def millis(value: object) -> int:
    """A BSON datetime as stored (milliseconds), whichever way the driver decoded it."""
    if isinstance(value, DatetimeMS):
        return int(value)
    if isinstance(value, dt.datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        return calendar.timegm(aware.utctimetuple()) * 1000 + aware.microsecond // 1000
    raise TypeError("recorded_at is not a date")


# A stored event as the verifier meets it: BSON bytes (bson_fields), a lazy raw document,
# or a decoded mapping (version 1 records, tests).
StoredEvent = bytes | RawBSONDocument | Mapping[str, Any]


def _as_bytes(event: StoredEvent) -> bytes:
    if isinstance(event, bytes):
        return event
    return bytes(event.raw) if isinstance(event, RawBSONDocument) else bson.encode(event)


def _as_mapping(event: StoredEvent) -> Mapping[str, Any]:
    if isinstance(event, bytes | RawBSONDocument):
        return bson.decode(_as_bytes(event))
    return event


def _event_id(event: StoredEvent) -> object:
    return string_field(event, "event_id") if isinstance(event, bytes) else event.get("event_id")


def _record_hash(prev: str, chain: str, seq: int, record: Mapping[str, Any], event: StoredEvent) -> str:
    version = record.get("v")
    if version is None:
        return link_hash(prev, chain, seq, _as_mapping(event))
    if version != RECORD_VERSION:
        raise ValueError("unknown record version")
    return link_hash_v2(prev, chain, seq, millis(record.get("recorded_at")), _as_bytes(event))


class ChainVerifier:
    """Checks one chain record by record (in seq order), so any length streams through."""

    def __init__(self, chain: str) -> None:
        self.chain = chain
        self.checked = 0
        self._expected = 1
        self._prev = GENESIS

    def feed(self, record: Mapping[str, Any]) -> Break | None:
        self.checked += 1
        seq = record.get("seq")
        expected = self._expected
        if record.get("chain") != self.chain:
            return Break(self.chain, expected, "record belongs to another chain")
        if seq != expected:
            reason = "record missing" if isinstance(seq, int) and seq > expected else "sequence out of order"
            return Break(self.chain, expected, reason)
        if record.get("prev_hash") != self._prev:
            return Break(self.chain, expected, "prev_hash does not match the previous record")
        event = record.get("event")
        try:
            if not isinstance(event, bytes | Mapping):
                raise TypeError("event is not a document")
            recomputed = _record_hash(self._prev, self.chain, expected, record, event)
        except (TypeError, ValueError, BSONError):
            return Break(self.chain, expected, "record malformed")
        if recomputed != record.get("hash"):
            return Break(self.chain, expected, "content does not match its hash")
        # The top-level event_id (unique index: what makes redelivery harmless) is outside the
        # hash; it must name the hashed event, or a redelivered event could be recorded twice.
        if record.get("event_id") != _event_id(event):
            return Break(self.chain, expected, "event_id does not match the event")
        self._prev = recomputed
        self._expected += 1
        return None


def verify_chain(chain: str, records: Iterable[Mapping[str, Any]]) -> tuple[int, Break | None]:
    """Walk one chain in seq order; return how many records were checked and the first break."""
    verifier = ChainVerifier(chain)
    for record in records:
        broken = verifier.feed(record)
        if broken:
            return verifier.checked, broken
    return verifier.checked, None
