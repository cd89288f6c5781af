from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from typing import Any

import bson
import pytest
from bson.datetime_ms import DatetimeMS
from bson.int64 import Int64
from bson.raw_bson import RawBSONDocument

from dicomsafe.v1 import audit_pb2
from services.audit.chain import (
    GENESIS,
    ChainVerifier,
    canonical,
    event_document,
    hashed_elements,
    link_hash,
    link_hash_v2,
    verify_chain,
)
from services.audit.checkpoints import Checkpoint
from services.audit.store import Head, chained_records


def _event(i: int) -> dict[str, Any]:
    event = audit_pb2.AuditEvent(
        event_id=f"e{i}",
        service="gateway",
        action=audit_pb2.AuditAction.AUDIT_ACTION_INSTANCE_RETRIEVED,
        outcome=audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS,
        actor="dr.house",
        actor_roles=["radiologist"],
        details={"bytes": str(i), "purpose": "treatment"},
    )
    event.occurred_at.FromSeconds(1_700_000_000 + i)
    return event_document(event)


def _chain(n: int, name: str = "audit.events:0") -> list[dict[str, Any]]:
    records, prev = [], GENESIS
    for seq in range(1, n + 1):
        event = _event(seq)
        digest = link_hash(prev, name, seq, event)
        records.append(
            {
                "chain": name,
                "seq": seq,
                "event_id": event["event_id"],
                "prev_hash": prev,
                "hash": digest,
                "event": event,
            }
        )
        prev = digest
    return records


def test_canonical_form_ignores_key_order_and_is_stable() -> None:
    event = _event(1)
    reordered = dict(reversed(list(event.items())))
    assert canonical("c", 1, event) == canonical("c", 1, reordered)
    assert b" " not in canonical("c", 1, {"a": "x"})
    assert link_hash(GENESIS, "c", 1, event) == link_hash(GENESIS, "c", 1, reordered)
    assert link_hash(GENESIS, "c", 1, event) != link_hash(GENESIS, "c", 2, event)  # position is bound
    assert link_hash(GENESIS, "c", 1, event) != link_hash(GENESIS, "d", 1, event)  # chain is bound


def test_intact_chain_verifies() -> None:
    report = verify_chain("audit.events:0", _chain(20))
    assert (report.records, report.ok, report.breaks) == (20, True, [])
    assert [(r.seq_from, r.seq_to) for r in report.intact] == [(1, 20)]
    empty = verify_chain("audit.events:0", [])
    assert (empty.records, empty.ok, empty.intact) == (0, True, [])


@pytest.mark.parametrize(
    "tamper,seq,reason",
    [
        (lambda r: r[6]["event"].update(actor="mallory"), 7, "content does not match its hash"),
        (lambda r: r.pop(4), 5, "record missing"),
        (
            lambda r: r.__setitem__(3, {**r[3], "prev_hash": "1" * 64}),
            4,
            "prev_hash does not match the previous record",
        ),
        (lambda r: r.insert(2, copy.deepcopy(r[1])), 2, "sequence out of order"),
        (lambda r: r[0].update(chain="other"), 1, "record belongs to another chain"),
        (lambda r: r[9].pop("event"), 10, "record malformed"),
        (lambda r: r[9].update(event="not a document"), 10, "record malformed"),
        (lambda r: r[2].update(event_id="e99"), 3, "event_id does not match the event"),
    ],
    ids=["edited", "deleted", "relinked", "duplicated", "moved", "malformed", "not-a-document", "event-id-swapped"],
)
def test_each_kind_of_tampering_names_the_first_broken_record(tamper: Any, seq: int, reason: str) -> None:
    records = _chain(12)
    tamper(records)
    breaks = verify_chain("audit.events:0", records).breaks
    assert breaks
    assert (breaks[0].seq, breaks[0].reason) == (seq, reason)


def test_rehashing_an_edited_record_still_breaks_the_next_link() -> None:
    records = _chain(5)
    records[1]["event"]["actor"] = "mallory"
    records[1]["hash"] = link_hash(records[1]["prev_hash"], "audit.events:0", 2, records[1]["event"])
    breaks = verify_chain("audit.events:0", records).breaks
    assert breaks and breaks[0].seq == 3


def test_canonical_form_is_pinned() -> None:
    """The stored hashes depend on these exact bytes: a change here breaks every existing chain."""
    event = audit_pb2.AuditEvent(
        event_id="e1",
        action=audit_pb2.AuditAction.AUDIT_ACTION_ACCESS_DECISION,
        outcome=audit_pb2.AuditOutcome.AUDIT_OUTCOME_DENIED,
        actor="dr.müller",
        details={"z": "1", "a.b": "2"},
    )
    event.occurred_at.FromNanoseconds(1_700_000_000_123_456_789)
    doc = event_document(event)
    expected = (
        '{"chain":"audit.events:3","event":{"action":"AUDIT_ACTION_ACCESS_DECISION","actor":"dr.müller",'
        '"details":{"a.b":"2","z":"1"},"event_id":"e1","occurred_at":"2023-11-14T22:13:20.123456789Z",'
        '"outcome":"AUDIT_OUTCOME_DENIED"},"seq":7}'
    ).encode()
    assert canonical("audit.events:3", 7, doc) == expected
    assert link_hash(GENESIS, "audit.events:3", 7, doc) == hashlib.sha256(bytes(32) + expected).hexdigest()
    prev = "ab" * 32
    assert link_hash(prev, "audit.events:3", 7, doc) == hashlib.sha256(bytes.fromhex(prev) + expected).hexdigest()


def test_default_values_are_left_out_so_the_form_is_stable() -> None:
    """proto3 defaults (empty strings, UNSPECIFIED, empty lists) never appear, whether set or not."""
    bare = audit_pb2.AuditEvent(event_id="e1")
    explicit = audit_pb2.AuditEvent(event_id="e1", actor="", reason="", actor_roles=[], details={})
    assert event_document(bare) == event_document(explicit) == {"event_id": "e1"}


def _chain_v2(n: int, name: str = "audit.events:0") -> list[dict[str, Any]]:
    events = [(f"e{i}", bson.encode(_event(i))) for i in range(1, n + 1)]
    return chained_records(name, Head(0, GENESIS), events)


def _both_ways(records: list[dict[str, Any]], name: str = "audit.events:0") -> tuple[int, str] | None:
    """Verify as mappings and as the stored bytes: both must reach the same verdict, whose first
    break is returned as (seq, reason)."""
    by_mappings = verify_chain(name, records).breaks
    verifier = ChainVerifier(name)
    for record in records:
        verifier.feed_bson(bson.encode(record))
    by_bytes = verifier.finish().breaks
    assert by_bytes == by_mappings
    return (by_mappings[0].seq, by_mappings[0].reason) if by_mappings else None


def test_version_2_chain_verifies_and_binds_every_field() -> None:
    records = _chain_v2(20)
    assert _both_ways(records) is None
    verifier = ChainVerifier("audit.events:0")
    assert all(verifier.feed_bson(bson.encode(r)) is None for r in records) and verifier.checked == 20
    edited = {**bson.decode(records[2]["event"].raw), "actor": "mallory"}
    tampers: list[Callable[[dict[str, Any]], object]] = [
        lambda r: r.update(recorded_at=DatetimeMS(int(r["recorded_at"]) + 1)),  # one millisecond later
        lambda r: r.update(event=RawBSONDocument(bson.encode(edited))),
        lambda r: r.update(note="added"),
        lambda r: r.update(seq=Int64(3)),  # the same number as another BSON type
    ]
    for tamper in tampers:
        records = _chain_v2(5)
        tamper(records[2])
        assert _both_ways(records) == (3, "content does not match its hash")
    records = _chain_v2(5)
    records[2]["event_id"] = "e99"
    assert _both_ways(records) == (3, "event_id does not match the event")
    records = _chain_v2(5)
    del records[2]["v"]  # read as version 1: its JSON form was never hashed
    assert _both_ways(records) == (3, "content does not match its hash")
    records = _chain_v2(5)
    records[1]["v"] = 3
    assert _both_ways(records) == (2, "record malformed")
    records = _chain_v2(5)
    del records[3]
    assert _both_ways(records) == (4, "record missing")


def test_version_2_form_is_pinned() -> None:
    """The stored hashes depend on these exact bytes: a change here breaks every existing chain."""
    event_bson = bson.encode({"event_id": "e1", "actor": "dr.müller"})
    record = {
        "chain": "audit.events:3",
        "seq": 7,
        "v": 2,
        "prev_hash": "ab" * 32,
        "event_id": "e1",
        "event": RawBSONDocument(event_bson),
        "recorded_at": DatetimeMS(1_700_000_000_123),
    }
    elements = (
        b"\x02chain\x00\x0f\x00\x00\x00audit.events:3\x00"
        + b"\x10seq\x00\x07\x00\x00\x00"
        + b"\x10v\x00\x02\x00\x00\x00"
        + b"\x02prev_hash\x00\x41\x00\x00\x00"
        + b"ab" * 32
        + b"\x00"
        + b"\x02event_id\x00\x03\x00\x00\x00e1\x00"
        + b"\x03event\x00"
        + event_bson
        + b"\x09recorded_at\x00"
        + (1_700_000_000_123).to_bytes(8, "little")
    )
    assert hashed_elements(record) == elements
    expected = hashlib.sha256(bytes.fromhex("ab" * 32) + b"dicomsafe/audit-record/v2\x00" + elements).hexdigest()
    assert link_hash_v2("ab" * 32, elements) == expected


def _spans(report: Any) -> list[tuple[int, int]]:
    return [(r.seq_from, r.seq_to) for r in report.intact]


def test_every_break_in_a_chain_is_reported_with_the_intact_ranges_between() -> None:
    """One record altered and a later one deleted in the same chain: both named, resynchronised
    on the next intact record's stored predecessor hash, and the ranges that verify listed."""
    records = _chain(20)
    records[4]["event"]["actor"] = "mallory"  # seq 5 altered
    del records[11]  # seq 12 deleted
    report = verify_chain("audit.events:0", records)
    assert not report.ok
    got = [(b.seq, b.last, b.kind) for b in report.breaks]
    assert got == [
        (5, 5, audit_pb2.BreakKind.BREAK_KIND_RECORD_ALTERED),
        (12, 12, audit_pb2.BreakKind.BREAK_KIND_RECORDS_MISSING),
    ]
    assert _spans(report) == [(1, 4), (6, 11), (13, 20)]


def test_a_rechained_forgery_is_caught_by_the_signed_checkpoint() -> None:
    """Records 6.. rehashed after an edit of 5 verify among themselves; the checkpoint signed at
    seq 10 before the forgery names the record that differs, and a tail cut after 15 is found."""
    records = _chain(20)
    signed = Checkpoint("audit.events:0", 10, records[9]["hash"], "vault:v1:unused")
    reach = Checkpoint("audit.events:0", 20, records[19]["hash"], "vault:v1:unused")
    records[4]["event"]["actor"] = "mallory"
    prev = records[3]["hash"]
    for r in records[4:]:
        r["prev_hash"] = prev
        r["hash"] = prev = link_hash(prev, "audit.events:0", r["seq"], r["event"])
    report = verify_chain("audit.events:0", records[:15], [signed, reach])
    kinds = [b.kind for b in report.breaks]
    assert audit_pb2.BreakKind.BREAK_KIND_CHECKPOINT_MISMATCH in kinds
    assert kinds[-1] == audit_pb2.BreakKind.BREAK_KIND_TAIL_TRUNCATED
    assert (report.breaks[-1].seq, report.breaks[-1].last) == (16, 20)


def test_two_chains_each_report_their_own_breaks() -> None:
    for name, cut in (("audit.events:0", 3), ("audit.events:1", 8)):
        records = _chain(10, name)
        del records[cut - 1]
        report = verify_chain(name, records)
        assert [(b.chain, b.seq) for b in report.breaks] == [(name, cut)]
