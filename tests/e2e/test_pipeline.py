"""The first vertical slice end to end: every service as its own process, real servers.

publish → ingest validates → crypto seals (Vault Transit) → dicom.stored → gateway
retrieval through authz → audit hash chain in MongoDB; bad input → dead-letter topic.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import time
import urllib.request
import uuid
from collections.abc import Callable

import grpc
import pydicom
import pytest
from aiokafka import AIOKafkaConsumer

from dicomsafe.common.grpc_runtime import new_channel
from dicomsafe.common.kafka import Topics, dlq_topic, headers_for, new_producer
from dicomsafe.v1 import audit_pb2, audit_pb2_grpc, events_pb2, retrieval_pb2, retrieval_pb2_grpc
from tests.audit_trail import verify_directly
from tools import dicom_samples
from tools.oidc_issuer import LocalIssuer
from tools.stack import Stack


def _topics(stack: Stack) -> Topics:
    return Topics(stack.settings.topic_prefix)


async def _publish(stack: Stack, items: list[tuple[bytes, bytes]]) -> None:
    producer = new_producer(stack.settings.kafka_bootstrap, "e2e-publisher")
    await producer.start()
    try:
        for key, data in items:
            req = events_pb2.IngestRequest(request_id=str(uuid.uuid4()), source="e2e-modality", inline_instance=data)
            await producer.send_and_wait(
                _topics(stack).ingest, req.SerializeToString(), key=key, headers=headers_for(req)
            )
    finally:
        await producer.stop()


async def _collect(
    bootstrap: str, topic: str, want: int, timeout_s: float = 120
) -> list[tuple[bytes, dict[str, bytes]]]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    got: list[tuple[bytes, dict[str, bytes]]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < want and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                got.extend((r.value, dict(r.headers)) for r in records)
    finally:
        await consumer.stop()
    return got


async def _retrieve(stack: Stack, token: str, object_id: str) -> bytes:
    async with new_channel(stack.settings.target("gateway"), stack.settings.client_tls("viewer")) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        request = retrieval_pb2.RetrieveRequest(access_token=token, object_id=object_id, purpose="treatment")
        return b"".join([p.data async for p in stub.Retrieve(request, timeout=60)])


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def _study(data: bytes) -> bytes:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).StudyInstanceUID).encode()


GOOD: list[tuple[str, Callable[[], bytes]]] = [
    ("bundled-ct", lambda: dicom_samples.bundled_files()[0].read_bytes()),
    ("mr-implicit", lambda: dicom_samples.to_bytes(dicom_samples.mr_image(study_uid=None, seed=11))),
    ("us-multiframe", lambda: dicom_samples.to_bytes(dicom_samples.us_multiframe(study_uid=None, seed=12, frames=4))),
    ("j2k", lambda: dicom_samples.to_bytes(dicom_samples.jpeg2000_lossless_ct(study_uid=None, seed=13))),
]
BAD = ["not_dicom", "truncated", "missing_sop_instance_uid"]


async def test_slice_end_to_end(stack: Stack, idp: LocalIssuer) -> None:
    good = [(name, make()) for name, make in GOOD]
    malformed = dicom_samples.malformed_samples()
    # All on one key (one partition): each bad record sits before a good one, which must
    # still be processed after the bad one is dead-lettered.
    key = b"1.2.826.0.1.3680043.8.498.1"
    items: list[tuple[bytes, bytes]] = []
    for i, (_, data) in enumerate(good):
        if i < len(BAD):
            items.append((key, malformed[BAD[i]]))
        items.append((key if i < len(BAD) else _study(data), data))
    await _publish(stack, items)

    bootstrap = stack.settings.kafka_bootstrap
    stored = [
        events_pb2.StoredEvent.FromString(v) for v, _ in await _collect(bootstrap, _topics(stack).stored, len(good))
    ]
    dead = await _collect(bootstrap, dlq_topic(_topics(stack).ingest), len(BAD))
    assert len(stored) == len(good)
    assert len(dead) == len(BAD)
    letters = [events_pb2.DeadLetter.FromString(v) for v, _ in dead]
    assert {h["dlq-reason"].decode() for _, h in dead} == {letter.reason_code for letter in letters}
    assert sorted(letter.reason_code for letter in letters) == ["missing_uid", "not_dicom", "truncated"]
    assert all(letter.reason and letter.original_value for letter in letters)

    by_sha = {hashlib.sha256(d).hexdigest(): d for _, d in good}
    assert set(by_sha) == {e.plaintext_sha256 for e in stored}
    await stack.wait_indexed({e.study_instance_uid for e in stored})
    store = stack.settings.work_dir / "store"
    for event in stored:
        original = by_sha[event.plaintext_sha256]
        sealed = next(store.rglob(f"{event.object_id}.dso")).read_bytes()
        assert bytes(128) + b"DICM" not in sealed  # "DICM" alone may occur in the base64 of the wrapped key
        assert dicom_samples.SYNTHETIC_MARKER not in sealed
        assert original[-2048:] not in sealed
        assert len(sealed) == event.sealed_size
        assert await _retrieve(stack, idp.token("dr.house"), event.object_id) == original

    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await _retrieve(stack, idp.token("res.rao"), stored[0].object_id)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await _retrieve(stack, idp.token("dr.house"), "f" * 64)
    assert unknown.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # sealed + stored per instance, a rejection per bad record, per retrieval an authz decision,
    # a crypto open and a gateway record (the denied one has no open), and per instance the open
    # by which the gateway's indexer reads it for the study index.
    want = 2 * len(good) + len(BAD) + 3 * len(good) + 2 + 1 + len(good)
    # Counted on the store directly first: reading through the service is itself audited.
    deadline = time.monotonic() + 120
    stored_verdict = await verify_directly(stack.settings.mongodb_uri, stack.settings.audit_db)
    while stored_verdict.records < want and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        stored_verdict = await verify_directly(stack.settings.mongodb_uri, stack.settings.audit_db)
    assert stored_verdict.ok, stored_verdict.breaks
    assert stored_verdict.records == want
    auditor = idp.token("aud.ito")
    async with new_channel(stack.settings.target("audit"), stack.settings.client_tls("ops")) as channel:
        audit = audit_pb2_grpc.AuditServiceStub(channel)
        verdict = await audit.Verify(audit_pb2.VerifyRequest(access_token=auditor))
        while verdict.checkpoints_checked == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            verdict = await audit.Verify(audit_pb2.VerifyRequest(access_token=auditor))
        records = [r async for r in audit.Query(audit_pb2.QueryRequest(limit=500, access_token=auditor))]
        with pytest.raises(grpc.aio.AioRpcError) as not_auditor:
            await audit.Verify(audit_pb2.VerifyRequest(access_token=idp.token("dr.house")))
    assert not_auditor.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert verdict.ok, list(verdict.broken)
    assert verdict.records_checked >= want
    assert verdict.checkpoints_checked >= 1  # chain heads are signed
    actions = [(r.event.action, r.event.outcome) for r in records]
    A, Out = audit_pb2.AuditAction, audit_pb2.AuditOutcome
    assert actions.count((A.AUDIT_ACTION_INSTANCE_REJECTED, Out.AUDIT_OUTCOME_FAILURE)) == len(BAD)
    assert actions.count((A.AUDIT_ACTION_INSTANCE_STORED, Out.AUDIT_OUTCOME_SUCCESS)) == len(good)
    assert (A.AUDIT_ACTION_ACCESS_DECISION, Out.AUDIT_OUTCOME_DENIED) in actions
    assert (A.AUDIT_ACTION_INSTANCE_RETRIEVED, Out.AUDIT_OUTCOME_DENIED) in actions
    assert actions.count((A.AUDIT_ACTION_INSTANCE_RETRIEVED, Out.AUDIT_OUTCOME_SUCCESS)) == len(good)
    # crypto names its callers by the identity in their client certificates (mutual TLS).
    seals = [r.event for r in records if r.event.action == A.AUDIT_ACTION_OBJECT_SEALED]
    opens = [r.event for r in records if r.event.action == A.AUDIT_ACTION_OBJECT_OPENED]
    assert seals and {e.actor for e in seals} == {"service:ingest"}
    assert opens and {e.details["caller"] for e in opens} == {"service:gateway"}
    # SRE view: the ingest consumer's counters agree with what happened.
    metrics = await asyncio.to_thread(_scrape, stack.settings.metrics_url("ingest"))
    topic = _topics(stack).ingest
    assert f'dicomsafe_kafka_records_total{{outcome="dead_lettered",service="ingest",topic="{topic}"}} 3.0' in metrics
    assert (
        f'dicomsafe_kafka_records_total{{outcome="processed",service="ingest",topic="{topic}"}} {len(good)}.0'
        in metrics
    )

    # Disclosures name the patient by pseudonym only, so "who saw this patient" is answerable.
    retrieved = [r.event for r in records if r.event.action == A.AUDIT_ACTION_INSTANCE_RETRIEVED]
    assert all(e.patient_ref for e in retrieved if e.outcome == Out.AUDIT_OUTCOME_SUCCESS)
    patient_ids = {m.PatientID for m in (pydicom.dcmread(io.BytesIO(d)) for _, d in good) if m.get("PatientID")}
    assert not any(pid in r.event.patient_ref or pid in r.event.reason for r in records for pid in patient_ids)


async def test_redelivered_instance_is_stored_once(stack: Stack) -> None:
    data = dicom_samples.to_bytes(dicom_samples.ct_image(study_uid=None, seed=99))
    await _publish(stack, [(_study(data), data), (_study(data), data)])
    sha = hashlib.sha256(data).hexdigest()
    deadline = time.monotonic() + 120
    mine: list[events_pb2.StoredEvent] = []
    while len(mine) < 2 and time.monotonic() < deadline:
        events = await _collect(stack.settings.kafka_bootstrap, _topics(stack).stored, 10_000, timeout_s=3)
        mine = [e for e in (events_pb2.StoredEvent.FromString(v) for v, _ in events) if e.plaintext_sha256 == sha]
    assert len(mine) == 2
    assert mine[0].object_id == mine[1].object_id
    assert sorted(e.redelivery for e in mine) == [False, True]
    assert len(list((stack.settings.work_dir / "store").rglob(f"{mine[0].object_id}.dso"))) == 1


async def test_same_uid_with_other_content_is_dead_lettered_and_the_first_kept(stack: Stack) -> None:
    """First stored wins: a second instance with the stored one's SOP Instance UID but other bytes
    goes to the dead-letter topic with its bytes and reason; the store keeps one object for it."""
    first = dicom_samples.ct_image(study_uid=None, seed=123)
    other = pydicom.dcmread(io.BytesIO(dicom_samples.to_bytes(first)))
    other.SeriesDescription = "re-sent with other content"
    data, changed = dicom_samples.to_bytes(first), dicom_samples.to_bytes(other)
    assert data != changed and other.SOPInstanceUID == first.SOPInstanceUID
    await _publish(stack, [(_study(data), data)])
    sha = hashlib.sha256(data).hexdigest()
    deadline = time.monotonic() + 120
    stored: list[events_pb2.StoredEvent] = []
    while not stored and time.monotonic() < deadline:
        events = await _collect(stack.settings.kafka_bootstrap, _topics(stack).stored, 10_000, timeout_s=3)
        stored = [e for e in (events_pb2.StoredEvent.FromString(v) for v, _ in events) if e.plaintext_sha256 == sha]
    assert len(stored) == 1
    await _publish(stack, [(_study(changed), changed)])
    letters: list[events_pb2.DeadLetter] = []
    deadline = time.monotonic() + 120
    while not letters and time.monotonic() < deadline:
        dead = await _collect(stack.settings.kafka_bootstrap, dlq_topic(_topics(stack).ingest), 10_000, timeout_s=3)
        letters = [
            d
            for d in (events_pb2.DeadLetter.FromString(v) for v, _ in dead)
            if d.reason_code == "duplicate_sop_instance"
            and events_pb2.IngestRequest.FromString(d.original_value).inline_instance == changed
        ]
    assert len(letters) == 1
    assert str(first.SOPInstanceUID) not in letters[0].reason
    # One sealed object for the UID: the first one.
    changed_sha = hashlib.sha256(changed).hexdigest()
    others = [
        e
        for e in (
            events_pb2.StoredEvent.FromString(v)
            for v, _ in await _collect(stack.settings.kafka_bootstrap, _topics(stack).stored, 10_000, timeout_s=3)
        )
        if e.plaintext_sha256 == changed_sha
    ]
    assert not others
    assert len(list((stack.settings.work_dir / "store").rglob(f"{stored[0].object_id}.dso"))) == 1
