from __future__ import annotations

import copy
import datetime as dt
import hashlib
from typing import Any

import bson
import pytest
from bson.raw_bson import RawBSONDocument

from dicomsafe.v1 import audit_pb2
from services.audit.chain import (
    GENESIS,
    RECORD_VERSION,
    Break,
    canonical,
    event_document,
    link_hash,
    link_hash_v2,
    millis,
    verify_chain,
)


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
    assert verify_chain("audit.events:0", _chain(20)) == (20, None)
    assert verify_chain("audit.events:0", []) == (0, None)


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
        (lambda r: r.insert(2, copy.deepcopy(r[1])), 3, "sequence out of order"),
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
    _, broken = verify_chain("audit.events:0", records)
    assert broken is not None
    assert (broken.seq, broken.reason) == (seq, reason)


def test_rehashing_an_edited_record_still_breaks_the_next_link() -> None:
    records = _chain(5)
    records[1]["event"]["actor"] = "mallory"
    records[1]["hash"] = link_hash(records[1]["prev_hash"], "audit.events:0", 2, records[1]["event"])
    _, broken = verify_chain("audit.events:0", records)
    assert broken is not None and broken.seq == 3


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
    records, prev = [], GENESIS
    at = dt.datetime(2026, 11, 25, 9, 0, tzinfo=dt.UTC)
    for seq in range(1, n + 1):
        event = RawBSONDocument(bson.encode(_event(seq)))
        digest = link_hash_v2(prev, name, seq, millis(at), bytes(event.raw))
        records.append(
            {
                "chain": name,
                "seq": seq,
                "v": RECORD_VERSION,
                "event_id": event["event_id"],
                "prev_hash": prev,
                "hash": digest,
                "event": event,
                "recorded_at": at,
            }
        )
        prev = digest
    return records


def test_version_2_chain_verifies_and_binds_time_and_version() -> None:
    assert verify_chain("audit.events:0", _chain_v2(20)) == (20, None)
    edited = {**bson.decode(_chain_v2(3)[2]["event"].raw), "actor": "mallory"}
    tampers: list[dict[str, Any]] = [
        {"recorded_at": dt.datetime(2026, 11, 25, 9, 0, 0, 1000, tzinfo=dt.UTC)},  # one millisecond later
        {"v": None},
        {"event": RawBSONDocument(bson.encode(edited))},
    ]
    for tamper in tampers:
        records = _chain_v2(5)
        records[2].update(tamper)
        _, broken = verify_chain("audit.events:0", records)
        assert broken is not None and (broken.seq, broken.reason) == (3, "content does not match its hash")
    records = _chain_v2(5)
    records[1]["v"] = 3
    assert verify_chain("audit.events:0", records)[1] == Break("audit.events:0", 2, "record malformed")


def test_version_2_form_is_pinned() -> None:
    """The stored hashes depend on these exact bytes: a change here breaks every existing chain."""
    event_bson = bson.encode({"event_id": "e1", "actor": "dr.müller"})
    expected = (
        b"dicomsafe/audit-record/v2\x00audit.events:3\x00"
        + (7).to_bytes(8, "big")
        + (1_700_000_000_123).to_bytes(8, "big")
        + event_bson
    )
    at = dt.datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=dt.UTC)
    assert millis(at) == millis(at.replace(tzinfo=None)) == 1_700_000_000_123
    digest = link_hash_v2("ab" * 32, "audit.events:3", 7, millis(at), event_bson)
    assert digest == hashlib.sha256(bytes.fromhex("ab" * 32) + expected).hexdigest()
