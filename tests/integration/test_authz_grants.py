"""Time-limited grants and break-glass against the running service, real MongoDB, real tokens."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import pytest
from aiokafka import AIOKafkaConsumer

from dicomsafe.common.kafka import Topics, ensure_topics, topic_specs
from dicomsafe.v1 import audit_pb2, authz_pb2, authz_pb2_grpc
from tests.servers import Servers
from tests.service_runner import authz_config, running_authz
from tools.oidc_issuer import LocalIssuer
from tools.pki import Pki

if TYPE_CHECKING:
    Stub = authz_pb2_grpc.AuthzServiceAsyncStub

S1, S2, S3 = "1.2.840.10008.1", "1.2.840.10008.2", "1.2.840.10008.3"


@pytest.fixture
async def authz(pki: Pki, servers: Servers, idp: LocalIssuer, unique: str) -> AsyncIterator[tuple[Stub, Topics]]:
    topics = Topics(f"t{unique}.")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=1))
    cfg = authz_config(
        servers.kafka_bootstrap, topics.prefix, idp, mongodb_uri=servers.mongodb_uri, mongodb_db=f"authz_{unique}"
    )
    async with running_authz(cfg, pki) as stub:
        yield stub, topics


def _who(idp: LocalIssuer, subject: str, mfa: bool = False) -> authz_pb2.Subject:
    return authz_pb2.Subject(access_token=idp.token(subject, amr=["pwd", "otp"] if mfa else ["pwd"]))


async def _can_read(stub: Stub, idp: LocalIssuer, subject: str, study: str) -> authz_pb2.CheckResponse:
    request = authz_pb2.CheckRequest(
        subject=_who(idp, subject),
        action="instance.read",
        resource=authz_pb2.Resource(type="instance", study_instance_uid=study),
    )
    response: authz_pb2.CheckResponse = await stub.Check(request)
    return response


async def _audited(
    servers: Servers, topics: Topics, action: audit_pb2.AuditAction.ValueType, expected: int
) -> list[audit_pb2.AuditEvent]:
    """The events of one action on the run's audit topic, once `expected` arrived (or 20 s)."""
    consumer = AIOKafkaConsumer(topics.audit, bootstrap_servers=servers.kafka_bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    found: list[audit_pb2.AuditEvent] = []
    deadline = time.monotonic() + 20
    try:
        while len(found) < expected and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                events = [audit_pb2.AuditEvent.FromString(r.value) for r in records]
                found += [e for e in events if e.action == action]
    finally:
        await consumer.stop()
    return found


def _grant(subject: str, study: str, start: dt.datetime, end: dt.datetime) -> authz_pb2.Grant:
    grant = authz_pb2.Grant(subject=subject, role="radiologist", study_instance_uid=study, reason="locum cover")
    grant.not_before.FromDatetime(start)
    grant.not_after.FromDatetime(end)
    return grant


async def test_time_limited_grants(authz, idp: LocalIssuer, servers: Servers) -> None:  # type: ignore[no-untyped-def]
    stub, topics = authz
    now = dt.datetime.now(dt.UTC)
    assert (await _can_read(stub, idp, "dr.locum", S1)).reason == "unknown subject"

    admin = _who(idp, "reg.omar")
    created = await stub.CreateGrant(
        authz_pb2.CreateGrantRequest(
            caller=admin, grant=_grant("dr.locum", S1, now - dt.timedelta(minutes=1), now + dt.timedelta(hours=8))
        )
    )
    later = await stub.CreateGrant(
        authz_pb2.CreateGrantRequest(
            caller=admin, grant=_grant("dr.locum", S2, now + dt.timedelta(hours=1), now + dt.timedelta(hours=9))
        )
    )
    assert created.created_by == "reg.omar"
    inside = await _can_read(stub, idp, "dr.locum", S1)
    assert inside.allow and inside.roles == ["radiologist"]
    assert not (await _can_read(stub, idp, "dr.locum", S2)).allow  # not yet valid
    assert not (await _can_read(stub, idp, "dr.locum", S3)).allow  # out of scope
    assert later.grant_id

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.CreateGrant(
            authz_pb2.CreateGrantRequest(
                caller=_who(idp, "dr.house"), grant=_grant("dr.pal", "", now, now + dt.timedelta(hours=1))
            )
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as too_long:
        await stub.CreateGrant(
            authz_pb2.CreateGrantRequest(caller=admin, grant=_grant("dr.pal", "", now, now + dt.timedelta(days=365)))
        )
    assert too_long.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A patient scope names the pseudonym, never a Patient ID in clear.
    by_mrn = _grant("dr.pal", "", now, now + dt.timedelta(hours=1))
    by_mrn.patient_ref = "MRN-0042"
    with pytest.raises(grpc.aio.AioRpcError) as clear_id:
        await stub.CreateGrant(authz_pb2.CreateGrantRequest(caller=admin, grant=by_mrn))
    assert clear_id.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "MRN" not in (clear_id.value.details() or "")

    revoked = await stub.RevokeGrant(
        authz_pb2.RevokeGrantRequest(caller=admin, grant_id=created.grant_id, reason="left")
    )
    assert revoked.HasField("revoked_at")
    assert not (await _can_read(stub, idp, "dr.locum", S1)).allow  # takes effect at once

    # Every change, and the refused attempt, is on the trail with who, whom, what and when.
    changes = await _audited(servers, topics, audit_pb2.AuditAction.AUDIT_ACTION_GRANT_CHANGED, 4)
    success = audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS
    done = [(e.actor, e.details["grant_id"], e.reason) for e in changes if e.outcome == success]
    assert done == [
        ("reg.omar", created.grant_id, "grant created: locum cover"),
        ("reg.omar", later.grant_id, "grant created: locum cover"),
        ("reg.omar", created.grant_id, "grant revoked: left"),
    ]
    first = next(e for e in changes if e.outcome == success)
    assert first.details["grantee"] == "dr.locum" and first.details["role"] == "radiologist"
    assert first.study_instance_uid == S1 and first.details["scope"] == "study"
    denied = [e for e in changes if e.outcome == audit_pb2.AuditOutcome.AUDIT_OUTCOME_DENIED]
    assert [e.actor for e in denied] == ["dr.house"]


async def test_break_glass(authz, idp: LocalIssuer, servers: Servers) -> None:  # type: ignore[no-untyped-def]
    stub, topics = authz
    assert not (await _can_read(stub, idp, "dr.er", S3)).allow

    async def glass(subject: str, mfa: bool, reason: str) -> authz_pb2.Grant:
        grant: authz_pb2.Grant = await stub.BreakGlass(
            authz_pb2.BreakGlassRequest(caller=_who(idp, subject, mfa), study_instance_uid=S3, reason=reason)
        )
        return grant

    for subject, mfa, reason, expected in [
        ("dr.er", False, "trauma bay 2", "multi-factor"),
        ("dr.er", True, "  ", "stated reason"),
        ("tech.jane", True, "curious", "no role of the subject grants emergency.access"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await glass(subject, mfa, reason)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert expected in (err.value.details() or "")

    grant = await glass("dr.er", True, "trauma bay 2: unconscious patient")
    assert grant.break_glass and grant.role == "emergency_reader"
    minutes = (grant.not_after.ToDatetime() - grant.not_before.ToDatetime()).total_seconds() / 60
    assert minutes == 30
    flagged = await _can_read(stub, idp, "dr.er", S3)
    assert flagged.allow and "break-glass" in flagged.obligations
    assert not (await _can_read(stub, idp, "dr.er", S1)).allow  # one study only
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await glass("dr.er", True, "still in theatre")
    assert "not renewable" in (again.value.details() or "")

    overrides = await _audited(servers, topics, audit_pb2.AuditAction.AUDIT_ACTION_EMERGENCY_OVERRIDE, 5)
    outcomes = [e.outcome for e in overrides]
    assert outcomes.count(audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS) == 1
    assert outcomes.count(audit_pb2.AuditOutcome.AUDIT_OUTCOME_DENIED) == 4
    started = next(e for e in overrides if e.outcome == audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS)
    assert started.actor == "dr.er" and started.study_instance_uid == S3 and "unconscious" in started.reason


async def test_break_glass_for_every_study_of_one_patient(authz, idp: LocalIssuer) -> None:  # type: ignore[no-untyped-def]
    """An unconscious patient's prior imaging: one override covers all of that patient's studies
    (named by pseudonym), none of anyone else's, and is as MFA-bound and non-renewable."""
    stub, _ = authz
    patient, other = "ab" * 16, "cd" * 16

    async def can_read(study: str, patient_ref: str) -> authz_pb2.CheckResponse:
        request = authz_pb2.CheckRequest(
            subject=_who(idp, "dr.er"),
            action="instance.read",
            resource=authz_pb2.Resource(type="instance", study_instance_uid=study, patient_ref=patient_ref),
        )
        response: authz_pb2.CheckResponse = await stub.Check(request)
        return response

    def glass(mfa: bool, **target: str) -> authz_pb2.BreakGlassRequest:
        return authz_pb2.BreakGlassRequest(caller=_who(idp, "dr.er", mfa), reason="unconscious, prior CT", **target)

    assert not (await can_read(S1, patient)).allow
    for request, expected in [
        (glass(False, patient_ref=patient), "multi-factor"),
        (glass(True, patient_ref=patient, study_instance_uid=S1), "either a study or a patient"),
        (glass(True), "either a study or a patient"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.BreakGlass(request)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert expected in (refused.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as clear_id:
        await stub.BreakGlass(glass(True, patient_ref="MRN-0042"))
    assert clear_id.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "MRN" not in (clear_id.value.details() or "")

    grant: authz_pb2.Grant = await stub.BreakGlass(glass(True, patient_ref=patient))
    assert grant.break_glass and grant.patient_ref == patient and not grant.study_instance_uid
    for study in (S1, S2):
        flagged = await can_read(study, patient)
        assert flagged.allow and "break-glass" in flagged.obligations
    assert not (await can_read(S3, other)).allow  # another patient
    assert not (await can_read(S3, "")).allow  # a study whose patient is not stated
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await stub.BreakGlass(glass(True, patient_ref=patient))
    assert "not renewable" in (again.value.details() or "")
