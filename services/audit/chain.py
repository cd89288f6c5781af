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
(`ChainVerifier.feed_bson`); anything else is parsed and what is wrong with it explained.

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
from typing import Any, TypeAlias

import bson
from bson.errors import BSONError
from bson.raw_bson import RawBSONDocument
from google.protobuf.json_format import MessageToDict

from dicomsafe.v1 import audit_pb2
from services.audit.bson_fields import parse, string_field
from services.audit.checkpoints import Checkpoint

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


Kind: TypeAlias = audit_pb2.BreakKind.ValueType
ALTERED = audit_pb2.BreakKind.BREAK_KIND_RECORD_ALTERED
LINK_BROKEN = audit_pb2.BreakKind.BREAK_KIND_LINK_BROKEN
MISSING = audit_pb2.BreakKind.BREAK_KIND_RECORDS_MISSING
OUT_OF_ORDER = audit_pb2.BreakKind.BREAK_KIND_SEQUENCE_OUT_OF_ORDER
MALFORMED = audit_pb2.BreakKind.BREAK_KIND_RECORD_MALFORMED
TRUNCATED = audit_pb2.BreakKind.BREAK_KIND_TAIL_TRUNCATED
CHECKPOINT_SIGNATURE_INVALID = audit_pb2.BreakKind.BREAK_KIND_CHECKPOINT_SIGNATURE_INVALID
CHECKPOINT_MISMATCH = audit_pb2.BreakKind.BREAK_KIND_CHECKPOINT_MISMATCH
CHECKPOINT_MALFORMED = audit_pb2.BreakKind.BREAK_KIND_CHECKPOINT_MALFORMED
# Breaks and intact ranges listed per chain; beyond, only counted. Runs of the same kind are
# merged, so this is only reached by a chain altered every other record, whose report would
# otherwise grow with the chain.
MAX_LISTED = 1000


@dataclass(frozen=True)
class Break:
    chain: str
    seq: int
    reason: str
    kind: Kind
    # The last seq concerned; 0 = seq alone.
    seq_to: int = 0
    # The stored record's event_id (its unique key), when there is a record.
    event_id: str = ""

    @property
    def last(self) -> int:
        return self.seq_to or self.seq


@dataclass
class IntactRange:
    """Records seq_from..seq_to verify and link; ``checkpoints`` signed heads among them
    matched (the one at ``last_checkpoint_seq`` confirms seq_from up to it)."""

    chain: str
    seq_from: int
    seq_to: int
    checkpoints: int = 0
    first_checkpoint_seq: int = 0
    last_checkpoint_seq: int = 0


@dataclass(frozen=True)
class ChainReport:
    chain: str
    records: int
    breaks: list[Break]
    intact: list[IntactRange]
    unlisted_breaks: int = 0
    unlisted_ranges: int = 0

    @property
    def ok(self) -> bool:
        return not self.breaks and not self.unlisted_breaks


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
    """Checks one chain record by record (in seq order), so any length streams through, and
    reports every break, not just the first: after one it resynchronises on the next record
    whose own hash recomputes, taking its stored prev_hash (or the hash of a signed checkpoint
    at the seq before it) as the link to check from there on.

    Signed checkpoints are given to `checkpoint` in seq order, each as soon as `last_seq`
    reaches its seq (right after the record at or beyond it); `finish` ends the walk."""

    def __init__(self, chain: str) -> None:
        self.chain = chain
        self.checked = 0
        self._expected = 1
        # The hash the next record's prev_hash must be; None right after a record whose own
        # hash did not recompute or after a gap: the next intact record is taken as it is.
        self._prev: str | None = GENESIS
        # Whether the record at last_seq verified (then its hash is _prev).
        self._last_intact = False
        # (seq, stored prev_hash) of the record that resynchronised without a link to check:
        # a signed checkpoint at the seq before it still checks that link.
        self._resync: tuple[int, str] | None = None
        self._range: IntactRange | None = None
        self._breaks: list[Break] = []
        self._intact: list[IntactRange] = []
        self._unlisted_breaks = 0
        self._unlisted_ranges = 0
        self._chain_element = _string_element(b"chain", chain.encode())

    @property
    def last_seq(self) -> int:
        """The highest seq met so far (gaps included)."""
        return self._expected - 1

    def feed_bson(self, doc: bytes) -> Break | None:
        """A record as stored (BSON, without ``_id``); the first break it shows, if any."""
        if self._in_writer_layout(doc):
            return None
        try:
            parsed = parse(doc)
        except BSONError:
            self.checked += 1
            seq = self._expected
            self._expected += 1
            return self._unverified(Break(self.chain, seq, "record malformed", MALFORMED))
        return self._check(parsed.fields, parsed.hashed)

    def feed(self, record: Mapping[str, Any]) -> Break | None:
        """A record as a mapping (decoded by the driver, or built in tests)."""
        return self._check(record, None)

    def _in_writer_layout(self, doc: bytes) -> bool:
        """The fast path: chain, seq, v and prev_hash are exactly what is expected, hash comes
        last, and the hash over everything between matches."""
        prev = self._prev
        if prev is None:
            return False
        expected = self._expected
        prefix = (
            self._chain_element
            + _int_element(b"seq", expected)
            + _VERSION_ELEMENT
            + _PREV_HEAD
            + prev.encode()
            + b"\x00"
        )
        tail = doc[-_HASH_TAIL:]
        if doc[4 : 4 + len(prefix)] != prefix or tail[: len(_HASH_HEAD)] != _HASH_HEAD or tail[-2:] != b"\x00\x00":
            return False
        digest = link_hash_v2(prev, doc[4:-_HASH_TAIL])
        if digest.encode() != tail[len(_HASH_HEAD) : -2]:
            return False
        self.checked += 1
        self._expected = expected + 1
        self._prev = digest
        self._last_intact = True
        if self._range is None:
            self._range = IntactRange(self.chain, expected, expected)
        else:
            self._range.seq_to = expected
        return True

    def _check(self, record: Mapping[str, Any], hashed: bytes | None) -> Break | None:
        self.checked += 1
        seq = record.get("seq")
        stored_id = record.get("event_id")
        event_id = stored_id if isinstance(stored_id, str) else ""
        if isinstance(seq, bool) or not isinstance(seq, int):
            # No position at all (the server sorts such a record after every number).
            return self._unverified(Break(self.chain, self._expected, "record malformed", MALFORMED, 0, event_id))
        if seq < self._expected:
            # A second record at a seq already met: the chain's order there is in doubt, but
            # the link from the record accepted at that seq still holds for the next.
            self._close_range()
            self._last_intact = False
            return self._report(Break(self.chain, seq, "sequence out of order", OUT_OF_ORDER, 0, event_id))
        gap = None
        if seq > self._expected:
            reason = "record missing" if seq == self._expected + 1 else "records missing"
            gap = self._unverified(Break(self.chain, self._expected, reason, MISSING, seq - 1))
        self._expected = seq + 1
        found = self._check_at(seq, record, hashed, event_id)
        return gap or found

    def _check_at(self, seq: int, record: Mapping[str, Any], hashed: bytes | None, event_id: str) -> Break | None:
        if record.get("chain") != self.chain:
            return self._unverified(Break(self.chain, seq, "record belongs to another chain", ALTERED, 0, event_id))
        prev, event, stored_hash = record.get("prev_hash"), record.get("event"), record.get("hash")
        relinked = False
        try:
            if not isinstance(event, bytes | Mapping) or not isinstance(prev, str):
                raise TypeError("event is not a document")
            version = record.get("v")
            if version is None:
                recomputed = link_hash(prev, self.chain, seq, _as_mapping(event))
                # Version 1 hashes the link but does not store it inside what is hashed: a
                # record that recomputes from the expected link had only its prev_hash changed.
                relinked = (
                    recomputed != stored_hash
                    and self._prev is not None
                    and link_hash(self._prev, self.chain, seq, _as_mapping(event)) == stored_hash
                )
            elif version == RECORD_VERSION:
                recomputed = link_hash_v2(prev, hashed if hashed is not None else hashed_elements(record))
            else:
                raise ValueError("unknown record version")
        except (TypeError, ValueError, BSONError):
            return self._unverified(Break(self.chain, seq, "record malformed", MALFORMED, 0, event_id))
        # The top-level event_id (unique index: what makes redelivery harmless) must name the
        # hashed event, or a redelivered event could be recorded twice. Version 2 covers it by
        # the hash too (version 1 does not); checked first, the reason names what was changed.
        if record.get("event_id") != _event_id(event):
            return self._unverified(Break(self.chain, seq, "event_id does not match the event", ALTERED, 0, event_id))
        if relinked:
            self._close_range()
            self._last_intact, self._prev = False, str(stored_hash)
            reason = "prev_hash does not match the previous record"
            return self._report(Break(self.chain, seq, reason, LINK_BROKEN, 0, event_id))
        if recomputed != stored_hash:
            return self._unverified(Break(self.chain, seq, "content does not match its hash", ALTERED, 0, event_id))
        # The record is what its hash says. Does it follow the one before?
        broken = None
        if self._prev is None:
            self._resync = (seq, prev)
            self._close_range()
        elif prev != self._prev:
            self._close_range()
            reason = "prev_hash does not match the previous record"
            broken = self._report(Break(self.chain, seq, reason, LINK_BROKEN, 0, event_id))
        self._prev, self._last_intact = recomputed, True
        if self._range is None:
            self._range = IntactRange(self.chain, seq, seq)
        else:
            self._range.seq_to = seq
        return broken

    def checkpoint(self, cp: Checkpoint) -> Break | None:
        """A validly signed checkpoint of this chain whose seq ``last_seq`` has reached."""
        if cp.seq == self.last_seq:
            if not self._last_intact:
                # The record there is missing or altered (already reported); the signed hash
                # is still a trustworthy link for the record after it.
                self._prev = cp.hash
                return None
            if cp.hash == self._prev and self._range is not None:
                r = self._range
                r.checkpoints += 1
                r.first_checkpoint_seq = r.first_checkpoint_seq or cp.seq
                r.last_checkpoint_seq = cp.seq
                return None
            # The record verifies, but is not the one signed: it leaves the intact range, and
            # its own hash stays the link for the next record (which may have been rechained).
            if self._range is not None:
                self._range.seq_to = cp.seq - 1
                if self._range.seq_to < self._range.seq_from:
                    self._range = None
                self._close_range()
            self._last_intact = False
            return self._report(
                Break(self.chain, cp.seq, "record differs from its signed checkpoint", CHECKPOINT_MISMATCH)
            )
        if self._resync is not None and self._resync[0] == cp.seq + 1:
            # A gap ends at cp.seq: the record after it must link to the signed hash.
            seq, prev = self._resync
            self._resync = None
            if prev != cp.hash:
                reason = "prev_hash does not match the signed checkpoint before it"
                return self._report(Break(self.chain, seq, reason, LINK_BROKEN))
        return None

    def bad_checkpoint(self, broken: Break) -> None:
        """A checkpoint of this chain that could not be used (malformed, signature invalid)."""
        self._report(broken)

    def finish(self, signed_reach: int = 0) -> ChainReport:
        """``signed_reach``: the highest seq a valid signed checkpoint names, if beyond last_seq."""
        self._close_range()
        if signed_reach > self.last_seq:
            reason = f"chain truncated: a signed checkpoint reaches seq {signed_reach}"
            self._report(Break(self.chain, self.last_seq + 1, reason, TRUNCATED, signed_reach))
        # Bad checkpoints are found while reading ahead of the records: seq order restored here.
        breaks = sorted(self._breaks, key=lambda b: (b.seq, b.last))
        return ChainReport(
            self.chain, self.checked, breaks, list(self._intact), self._unlisted_breaks, self._unlisted_ranges
        )

    def _unverified(self, broken: Break) -> Break:
        """A seq (or run) without a record whose hash recomputes: resynchronise after it."""
        self._close_range()
        self._prev, self._last_intact = None, False
        return self._report(broken)

    def _close_range(self) -> None:
        if self._range is None:
            return
        if len(self._intact) < MAX_LISTED:
            self._intact.append(self._range)
        else:
            self._unlisted_ranges += 1
        self._range = None

    def _report(self, broken: Break) -> Break:
        last = self._breaks[-1] if self._breaks else None
        if (
            last is not None
            and (last.kind, last.reason) == (broken.kind, broken.reason)
            and broken.kind in (ALTERED, MALFORMED, MISSING)
            and last.last + 1 == broken.seq
        ):
            # A run of one kind (every record's field rewritten, say) is one entry.
            self._breaks[-1] = Break(last.chain, last.seq, last.reason, last.kind, broken.last, last.event_id)
        elif len(self._breaks) < MAX_LISTED:
            self._breaks.append(broken)
        else:
            self._unlisted_breaks += 1
        return broken


def verify_chain(
    chain: str, records: Iterable[Mapping[str, Any]], checkpoints: Iterable[Checkpoint] = ()
) -> ChainReport:
    """Walk one chain (records and validly signed checkpoints each in seq order); every break."""
    verifier = ChainVerifier(chain)
    pending = iter(checkpoints)
    cp = next(pending, None)
    for record in records:
        verifier.feed(record)
        while cp is not None and cp.seq <= verifier.last_seq:
            verifier.checkpoint(cp)
            cp = next(pending, None)
    reach = 0
    while cp is not None:
        reach = max(reach, cp.seq)
        cp = next(pending, None)
    return verifier.finish(reach)
