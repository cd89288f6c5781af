"""Roles from the identity provider's claims and grants to every holder of a role, against the
running service with real tokens (local issuer), grants in MongoDB and the audit stream in Kafka."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from pymongo import AsyncMongoClient

from dicomsafe.common.grpc_runtime import new_channel
from dicomsafe.common.kafka import Topics, ensure_topics, topic_specs
from dicomsafe.v1 import audit_pb2, authz_pb2, authz_pb2_grpc
from services.authz.app import run
from services.authz.config import AuthzConfig
from services.authz.tokens import TokenVerifier
from tests.servers import Servers
from tests.service_runner import TEST_CLIENT, running, with_tls
from tests.topic_reader import read_to_end
from tools.oidc_issuer import LocalIssuer
from tools.pki import Pki
from tools.ports import free_port
from tools.stack import POLICY_FILE

if TYPE_CHECKING:
    Stub = authz_pb2_grpc.AuthzServiceAsyncStub

CARDIOLOGY, ONCOLOGY = "cardiology", "oncology"


def _config(servers: Servers, topics: Topics, unique: str, idp: LocalIssuer | None) -> AuthzConfig:
    return AuthzConfig(
        grpc_bind=f"127.0.0.1:{free_port()}",
        policy_file=POLICY_FILE,
        kafka_bootstrap=servers.kafka_bootstrap,
        topic_prefix=topics.prefix,
        oidc_issuer=idp.url if idp else "",
        oidc_jwks_url=idp.jwks_url if idp else "",
        mongodb_uri=servers.mongodb_uri,
        mongodb_db=f"authz_{unique}",
    )


@pytest.fixture
async def authz(pki: Pki, servers: Servers, idp: LocalIssuer, unique: str) -> AsyncIterator[tuple[Stub, Topics]]:
    topics = Topics(f"t{unique}.")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=1))
    cfg = with_tls(_config(servers, topics, unique, idp), pki, "authz")
    async with (
        running(lambda stop: run(cfg, stop), cfg.grpc_bind, pki.tls(TEST_CLIENT)),
        new_channel(cfg.grpc_bind, pki.tls(TEST_CLIENT)) as ch,
    ):
        yield authz_pb2_grpc.AuthzServiceStub(ch), topics


def _who(idp: LocalIssuer, subject: str, groups: list[str] | None = None) -> authz_pb2.Subject:
    extra = {"groups": groups} if groups is not None else None
    return authz_pb2.Subject(access_token=idp.token(subject, extra=extra))


async def _read(stub: Stub, who: authz_pb2.Subject, department: str = CARDIOLOGY) -> authz_pb2.CheckResponse:
    request = authz_pb2.CheckRequest(
        subject=who,
        action="instance.read",
        resource=authz_pb2.Resource(type="instance", study_instance_uid="1.2.3", site="north", department=department),
    )
    response: authz_pb2.CheckResponse = await stub.Check(request)
    return response


def test_the_verifier_exposes_the_claim_values(idp: LocalIssuer) -> None:
    verifier = TokenVerifier(idp.url, "dicomsafe", idp.jwks_url, remember_s=0)
    token = idp.token(
        "kc-1",
        extra={
            "groups": ["/radiology/consultants", 7, "", {"x": 1}],
            "roles": "radiologist",
            "realm_access": {"roles": ["offline_access", "radiologist"]},
            "https://hospital.example/roles": ["reader"],
        },
    )
    identity = verifier.verify(token)
    assert identity.claim_values("groups") == ("/radiology/consultants",)  # non-strings ignored
    assert identity.claim_values("roles") == ("radiologist",)  # a single string is one value
    assert identity.claim_values("realm_access.roles") == ("offline_access", "radiologist")  # Keycloak's nesting
    assert identity.claim_values("https://hospital.example/roles") == ("reader",)  # a namespaced claim, as is
    assert identity.claim_values("absent") == () and identity.claim_values("sub.x") == ()


async def test_roles_from_token_claims(authz: tuple[Stub, Topics], idp: LocalIssuer, servers: Servers) -> None:
    stub, topics = authz
    consultant = await _read(stub, _who(idp, "kc-7f3a", ["/radiology/consultants", "/staff/all"]))
    assert consultant.allow and consultant.roles == ["radiologist"] and consultant.subject == "kc-7f3a"
    # Values the policy does not map confer nothing, and neither does a role name used as a group.
    for groups in (["/staff/all", "radiologist"], [], None):
        unmapped = await _read(stub, _who(idp, "kc-7f3a", groups))
        assert (unmapped.allow, unmapped.reason_code) == (False, "unknown_subject")
    # A mapping's scope holds: cardiology referrers read cardiology only.
    referrer = _who(idp, "kc-11", ["/cardiology/referrers"])
    assert (await _read(stub, referrer)).allow
    assert (await _read(stub, referrer, ONCOLOGY)).reason_code == "out_of_scope"
    # The subjects table still applies, and claims add to it (tech.jane also a cardiology referrer).
    jane = await _read(stub, _who(idp, "tech.jane", ["/cardiology/referrers"]))
    assert jane.allow and jane.roles == ["technologist", "referring_physician"]
    assert not (await _read(stub, _who(idp, "tech.jane"))).allow
    # Claims only count in a token the issuer signed: forged groups are an unauthenticated deny.
    header, payload, _ = idp.token("kc-7f3a", extra={"groups": ["/radiology/consultants"]}).split(".")
    forged = await _read(stub, authz_pb2.Subject(access_token=f"{header}.{payload}.AAAA"))
    assert (forged.allow, forged.reason_code) == (False, "unauthenticated")

    # The audit trail names the roles the claims conferred.
    events = [audit_pb2.AuditEvent.FromString(v) for v in await read_to_end(servers.kafka_bootstrap, topics.audit)]
    first = next(e for e in events if e.details.get("decision_id") == consultant.decision_id)
    assert list(first.actor_roles) == ["radiologist"] and first.actor == "kc-7f3a"


async def test_claims_are_never_taken_from_an_unverified_request(pki: Pki, servers: Servers, unique: str) -> None:
    """Development mode trusts subject.id, and nothing else: a group in the request context is no claim."""
    topics = Topics(f"t{unique}.")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=1))
    cfg = with_tls(_config(servers, topics, unique, None), pki, "authz")
    async with (
        running(lambda stop: run(cfg, stop), cfg.grpc_bind, pki.tls(TEST_CLIENT)),
        new_channel(cfg.grpc_bind, pki.tls(TEST_CLIENT)) as ch,
    ):
        stub = authz_pb2_grpc.AuthzServiceStub(ch)
        request = authz_pb2.CheckRequest(
            subject=authz_pb2.Subject(id="kc-7f3a"),
            action="instance.read",
            resource=authz_pb2.Resource(type="instance", study_instance_uid="1.2.3"),
            context={"groups": "/radiology/consultants", "roles": "radiologist"},
        )
        reply = await stub.Check(request)
        assert (reply.allow, reply.reason_code) == (False, "unknown_subject")
        assert (
            await stub.Check(authz_pb2.CheckRequest(subject=authz_pb2.Subject(id="dr.house"), action="instance.read"))
        ).allow


def _to_holders(holder: str, department: str, start: dt.datetime, end: dt.datetime) -> authz_pb2.Grant:
    grant = authz_pb2.Grant(
        grantee_role=holder, role="referring_physician", department=department, reason="weekend cover"
    )
    grant.not_before.FromDatetime(start)
    grant.not_after.FromDatetime(end)
    return grant


async def test_grants_to_every_holder_of_a_role(
    authz: tuple[Stub, Topics], idp: LocalIssuer, servers: Servers, unique: str
) -> None:
    stub, topics = authz
    admin = _who(idp, "reg.omar")
    now = dt.datetime.now(dt.UTC)
    soon = now + dt.timedelta(seconds=6)

    async def create(grant: authz_pb2.Grant, caller: authz_pb2.Subject = admin) -> authz_pb2.Grant:
        created: authz_pb2.Grant = await stub.CreateGrant(authz_pb2.CreateGrantRequest(caller=caller, grant=grant))
        return created

    # Every emergency physician: cardiology now, oncology from tomorrow, radiology for a few seconds.
    cardiology = await create(
        _to_holders("emergency_physician", CARDIOLOGY, now - dt.timedelta(minutes=1), now + dt.timedelta(hours=48))
    )
    oncology = await create(
        _to_holders("emergency_physician", ONCOLOGY, now + dt.timedelta(days=1), now + dt.timedelta(days=2))
    )
    brief = await create(_to_holders("emergency_physician", "radiology", now - dt.timedelta(minutes=1), soon))
    assert cardiology.grantee_role == "emergency_physician" and not cardiology.subject
    assert cardiology.created_by == "reg.omar"

    standing, by_claim = _who(idp, "dr.er"), _who(idp, "kc-ed-4", ["/emergency/physicians"])
    for holder in (standing, by_claim):
        within = await _read(stub, holder)
        assert within.allow and within.roles == ["emergency_physician", "referring_physician"]
        assert (await _read(stub, holder, ONCOLOGY)).reason_code == "out_of_scope"  # not yet valid there
        assert (await _read(stub, holder, "radiology")).allow
    # Not a holder: another job, an unmapped group, a subject nobody knows.
    assert (await _read(stub, _who(idp, "tech.jane"))).reason_code == "no_role"
    assert (await _read(stub, _who(idp, "kc-ed-5", ["/emergency/visitors"]))).reason_code == "unknown_subject"
    assert (await _read(stub, _who(idp, "dr.locum"))).reason_code == "unknown_subject"

    # Expiry counts on the very next check, without any sweep.
    await asyncio.sleep(max(0.0, (soon - dt.datetime.now(dt.UTC)).total_seconds() + 0.3))
    assert (await _read(stub, standing, "radiology")).reason_code == "out_of_scope"
    await stub.RevokeGrant(authz_pb2.RevokeGrantRequest(caller=admin, grant_id=cardiology.grant_id, reason="covered"))
    for holder in (standing, by_claim):
        revoked = await _read(stub, holder)
        # Nothing left in force (the oncology grant has not started): no role reads at all.
        assert (revoked.allow, revoked.reason_code) == (False, "no_role")

    # Exactly one grantee; a role with holders; a manager to ask.
    refusals = {
        "both": authz_pb2.Grant(subject="dr.x", grantee_role="radiologist", role="registrar", reason="r"),
        "ghost": authz_pb2.Grant(grantee_role="locum", role="registrar", reason="r"),
        "glass": authz_pb2.Grant(grantee_role="emergency_reader", role="registrar", reason="r"),
    }
    for grant in refusals.values():
        grant.not_after.FromDatetime(now + dt.timedelta(hours=1))
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await create(grant)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as not_a_manager:
        await create(_to_holders("radiologist", CARDIOLOGY, now, now + dt.timedelta(hours=1)), _who(idp, "dr.er"))
    assert not_a_manager.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # Audited as grant changes naming the role, not a person.
    events = [audit_pb2.AuditEvent.FromString(v) for v in await read_to_end(servers.kafka_bootstrap, topics.audit)]
    changes = [e for e in events if e.action == audit_pb2.AuditAction.AUDIT_ACTION_GRANT_CHANGED]
    success = audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS
    done = [
        (e.details["grant_id"], e.details["grantee_role"], e.details["grantee"], e.reason)
        for e in changes
        if e.outcome == success
    ]
    assert done == [
        (cardiology.grant_id, "emergency_physician", "", "grant created: weekend cover"),
        (oncology.grant_id, "emergency_physician", "", "grant created: weekend cover"),
        (brief.grant_id, "emergency_physician", "", "grant created: weekend cover"),
        (cardiology.grant_id, "emergency_physician", "", "grant revoked: covered"),
    ]
    assert [e.actor for e in changes if e.outcome != success] == ["dr.er"]

    # The check's read is served by an index per half (own grants, grants of held roles).
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(servers.mongodb_uri)
    try:
        indexes = {i["name"]: list(i["key"]) async for i in await client[f"authz_{unique}"]["grants"].list_indexes()}
    finally:
        await client.close()
    assert indexes["subject_expiry"] == ["subject", "not_after"]
    assert indexes["grantee_role_expiry"] == ["grantee_role", "not_after"]
