"""The hash chain: canonical form of a record and its verification. Pure functions.

    hash_n = SHA-256(bytes(prev_hash_n) || canonical({"chain", "seq", "event"}))

The event is kept as the JSON mapping of its protobuf (field names as in the .proto), which
round-trips through MongoDB unchanged; canonical JSON (sorted keys, no whitespace, UTF-8)
makes the hash independent of key order. Binding chain and seq into the hash stops a record
from being moved to another position or chain.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.json_format import MessageToDict

from dicomsafe.v1 import audit_pb2

GENESIS = "0" * 64


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
    return hashlib.sha256(bytes.fromhex(prev_hash) + canonical(chain, seq, event)).hexdigest()


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
            if not isinstance(event, Mapping):
                raise TypeError("event is not a document")
            recomputed = link_hash(self._prev, self.chain, expected, event)
        except (TypeError, ValueError):
            return Break(self.chain, expected, "record malformed")
        if recomputed != record.get("hash"):
            return Break(self.chain, expected, "content does not match its hash")
        # The top-level event_id (unique index: what makes redelivery harmless) is outside the
        # hash; it must name the hashed event, or a redelivered event could be recorded twice.
        if record.get("event_id") != event.get("event_id"):
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
