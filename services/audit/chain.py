"""The hash chain: canonical form of a record and its verification. Pure functions.

Records of version 2 (field ``v: 2``) are hashed over their own BSON bytes:

    hash_n = SHA-256(bytes(prev_hash_n) || "dicomsafe/audit-record/v2" 0x00 || E_n)

where E_n is the record's BSON elements as stored, in stored order, except ``_id`` and
``hash``: chain, seq, v, prev_hash, event_id, event, recorded_at (the writer's order; ``hash``
last). So every stored field is covered — ``recorded_at`` too, the time range queries,
reports and breach lists filter on — and so is every byte (a value's type, a field added).
MongoDB keeps a document's bytes and field order, so verifying hashes bytes straight off the
wire: no decoding, no re-canonicalising. Records in the writer's exact layout are checked
by comparing a prefix built from the expected chain, seq and prev_hash and hashing the rest
(`ChainVerifier.feed_bson`); anything else is parsed and its first broken link explained.

Records of version 1 (no ``v``, written before) keep verifying with their own form:

    hash_n = SHA-256(bytes(prev_hash_n) || canonical_json({"chain", "seq", "event"}))

canonical JSON = sorted keys, no whitespace, UTF-8; their ``recorded_at`` is not covered.
Binding chain and seq into the hash stops a record from being moved to another position or chain.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import bson
from bson.errors import BSONError
from bson.raw_bson import RawBSONDocument
from google.protobuf.json_format import MessageToDict

from dicomsafe.v1 import audit_pb2
from services.audit.bson_fields import parse, string_field

GENESIS = "0" * 64
RECORD_VERSION = 2
_V2_DOMAIN = b"dicomsafe/audit-record/v2\x00"
_UNHASHED = ("_id", "hash")
# Pieces of the writer's layout, for the fast path.
_INT32, _INT64 = struct.Struct("<i"), struct.Struct("<q")
_VERSION_ELEMENT = b"\x10v\x00" + _INT32.pack(RECORD_VERSION)
_PREV_HEAD = b"\x02prev_hash\x00" + _INT32.pack(65)
_HASH_HEAD = b"\x02hash\x00" + _INT32.pack(65)
_HASH_TAIL = len(_HASH_HEAD) + 64 + 2  # head, hex digest, its NUL, the document's terminator


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


def link_hash_v2(prev_hash: str, hashed_elements: bytes) -> str:
    return hashlib.sha256(bytes.fromhex(prev_hash) + _V2_DOMAIN + hashed_elements).hexdigest()


def hashed_elements(record: Mapping[str, Any]) -> bytes:
    """E of a record given as a mapping: its elements as BSON encodes them, in its order."""
    return bson.encode({k: v for k, v in record.items() if k not in _UNHASHED})[4:-1]


def _as_mapping(event: object) -> Mapping[str, Any]:
    if isinstance(event, bytes):
        return bson.decode(event)
    if isinstance(event, RawBSONDocument):
        return bson.decode(event.raw)
    if isinstance(event, Mapping):
        return event
    raise TypeError("event is not a document")


def _event_id(event: bytes | Mapping[str, Any]) -> object:
    return string_field(event, "event_id") if isinstance(event, bytes) else event.get("event_id")


def _string_element(name: bytes, value: bytes) -> bytes:
    return b"\x02" + name + b"\x00" + _INT32.pack(len(value) + 1) + value + b"\x00"


def _int_element(name: bytes, value: int) -> bytes:
    # As BSON encoders choose: int32 when it fits.
    if -(2**31) <= value < 2**31:
        return b"\x10" + name + b"\x00" + _INT32.pack(value)
    return b"\x12" + name + b"\x00" + _INT64.pack(value)


class ChainVerifier:
    """Checks one chain record by record (in seq order), so any length streams through."""

    def __init__(self, chain: str) -> None:
        self.chain = chain
        self.checked = 0
        self._expected = 1
        self._prev = GENESIS
        self._chain_element = _string_element(b"chain", chain.encode())

    @property
    def head(self) -> str:
        """The hash of the last record accepted."""
        return self._prev

    def feed_bson(self, doc: bytes) -> Break | None:
        """A record as stored (BSON, without ``_id``)."""
        if self._in_writer_layout(doc):
            return None
        try:
            parsed = parse(doc)
        except BSONError:
            self.checked += 1
            return Break(self.chain, self._expected, "record malformed")
        return self._check(parsed.fields, parsed.hashed)

    def feed(self, record: Mapping[str, Any]) -> Break | None:
        """A record as a mapping (decoded by the driver, or built in tests)."""
        return self._check(record, None)

    def _in_writer_layout(self, doc: bytes) -> bool:
        """The fast path: chain, seq, v and prev_hash are exactly what is expected, hash comes
        last, and the hash over everything between matches."""
        prefix = (
            self._chain_element
            + _int_element(b"seq", self._expected)
            + _VERSION_ELEMENT
            + _PREV_HEAD
            + self._prev.encode()
            + b"\x00"
        )
        tail = doc[-_HASH_TAIL:]
        if doc[4 : 4 + len(prefix)] != prefix or tail[: len(_HASH_HEAD)] != _HASH_HEAD or tail[-2:] != b"\x00\x00":
            return False
        digest = link_hash_v2(self._prev, doc[4:-_HASH_TAIL])
        if digest.encode() != tail[len(_HASH_HEAD) : -2]:
            return False
        self.checked += 1
        self._prev = digest
        self._expected += 1
        return True

    def _check(self, record: Mapping[str, Any], hashed: bytes | None) -> Break | None:
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
            version = record.get("v")
            if version is None:
                recomputed = link_hash(self._prev, self.chain, expected, _as_mapping(event))
            elif version == RECORD_VERSION:
                recomputed = link_hash_v2(self._prev, hashed if hashed is not None else hashed_elements(record))
            else:
                raise ValueError("unknown record version")
        except (TypeError, ValueError, BSONError):
            return Break(self.chain, expected, "record malformed")
        # The top-level event_id (unique index: what makes redelivery harmless) must name the
        # hashed event, or a redelivered event could be recorded twice. Version 2 covers it by
        # the hash too (version 1 does not); checked first, the reason names what was changed.
        if record.get("event_id") != _event_id(event):
            return Break(self.chain, expected, "event_id does not match the event")
        if recomputed != record.get("hash"):
            return Break(self.chain, expected, "content does not match its hash")
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
