"""authz with a real OIDC issuer on loopback: tokens verified against its JWKS over HTTP.

Every bad token is denied with a clear reason (and audited); nothing crashes.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest
from aiokafka import AIOKafkaConsumer

from dicomsafe.common.kafka import Topics, ensure_topics, topic_specs
from dicomsafe.v1 import audit_pb2, authz_pb2, authz_pb2_grpc
from services.authz.tokens import TokenRejected, TokenVerifier
from tests.servers import Servers
from tests.service_runner import authz_config, running_authz
from tools.oidc_issuer import LocalIssuer, running_issuer
from tools.pki import Pki

if TYPE_CHECKING:
    Stub = authz_pb2_grpc.AuthzServiceAsyncStub


@pytest.fixture
async def authz(pki: Pki, servers: Servers, idp: LocalIssuer, unique: str) -> AsyncIterator[tuple[Stub, Topics]]:
    topics = Topics(f"t{unique}.")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=1))
    cfg = authz_config(servers.kafka_bootstrap, topics.prefix, idp, oidc_audience="dicomsafe", oidc_leeway_s=5)
    async with running_authz(cfg, pki) as stub:
        yield stub, topics


def _check(token: str, labels: tuple[str, ...] = (), subject: str = "") -> authz_pb2.CheckRequest:
    return authz_pb2.CheckRequest(
        subject=authz_pb2.Subject(id=subject, access_token=token),
        action="instance.read",
        resource=authz_pb2.Resource(type="instance", study_instance_uid="1.2.3", labels=list(labels)),
    )


def _unsigned(claims: dict[str, object], kid: str) -> str:
    def part(obj: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT', 'kid': kid})}.{part(claims)}."


async def test_valid_tokens_and_mfa_step_up(authz, idp: LocalIssuer) -> None:  # type: ignore[no-untyped-def]
    stub, _ = authz
    allowed = await stub.Check(_check(idp.token("dr.house")))
    assert allowed.allow and allowed.roles == ["radiologist"]
    rsa = await stub.Check(_check(idp.token("dr.house", algorithm="RS256")))
    assert rsa.allow
    vip = await stub.Check(_check(idp.token("dr.house", amr=["pwd"]), labels=("vip",)))
    assert not vip.allow and vip.obligations == ["mfa-required"]
    stepped_up = await stub.Check(_check(idp.token("dr.house", amr=["pwd", "otp"]), labels=("vip",)))
    assert stepped_up.allow
    mismatch = await stub.Check(_check(idp.token("dr.house"), subject="dr.wilson"))
    assert not mismatch.allow and mismatch.reason == "subject does not match the token"


async def test_every_bad_token_is_denied_with_a_reason(authz, idp: LocalIssuer, servers: Servers) -> None:  # type: ignore[no-untyped-def]
    stub, topics = authz
    now = int(time.time())
    with running_issuer() as impostor:
        forged = impostor.token("dr.house", issuer=idp.url, kid=idp.ec_kid)  # right kid, wrong key
        cases = {
            "": "unauthenticated: no access token",
            "not-a-jwt": "unauthenticated: malformed token",
            idp.token("dr.house", lifetime_s=-120): "unauthenticated: token expired",
            idp.token("dr.house", not_before_s=600): "unauthenticated: token not yet valid",
            idp.token("dr.house", issuer="https://evil.example"): "unauthenticated: token issuer mismatch",
            idp.token("dr.house", audience="other-app"): "unauthenticated: token audience mismatch",
            forged: "unauthenticated: token signature invalid",
            idp.token("dr.house", kid="no-such-kid"): "unauthenticated: unknown signing key",
            _unsigned(
                {"iss": idp.url, "sub": "dr.house", "aud": "dicomsafe", "iat": now, "exp": now + 300}, idp.ec_kid
            ): "unauthenticated: token algorithm not allowed",
        }
        for token, reason in cases.items():
            request = _check(token, subject="dr.house" if not token else "")
            decision = await stub.Check(request)
            assert not decision.allow, reason
            assert decision.reason == reason
    # Every one of those refusals is in the audit stream.
    consumer = AIOKafkaConsumer(topics.audit, bootstrap_servers=servers.kafka_bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    reasons: list[str] = []
    deadline = time.monotonic() + 30
    try:
        while len(reasons) < len(cases) and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                reasons += [audit_pb2.AuditEvent.FromString(r.value).reason for r in records]
    finally:
        await consumer.stop()
    assert sorted(reasons) == sorted(cases.values())


def test_a_remembered_token_ends_with_its_expiry(idp: LocalIssuer) -> None:
    """Verified tokens are remembered, never past their own expiry; refusals are not remembered."""
    verifier = TokenVerifier(idp.url, "dicomsafe", idp.jwks_url, leeway_s=0, remember_s=60)
    token = idp.token("dr.house", amr=["pwd", "otp"], lifetime_s=2)
    assert verifier.remembered(token) is None
    identity = verifier.verify(token)
    assert (identity.subject, identity.mfa) == ("dr.house", True)
    assert verifier.remembered(token) == identity
    wrong_audience = idp.token("dr.house", audience="elsewhere")
    with pytest.raises(TokenRejected):
        verifier.verify(wrong_audience)
    assert verifier.remembered(wrong_audience) is None
    time.sleep(3.1)  # past the token's exp (whole seconds)
    assert verifier.remembered(token) is None
    with pytest.raises(TokenRejected, match="expired"):
        verifier.verify(token)
    off = TokenVerifier(idp.url, "dicomsafe", idp.jwks_url, remember_s=0)
    fresh = idp.token("dr.house")
    off.verify(fresh)
    assert off.remembered(fresh) is None


def test_mfa_comes_from_a_second_factor_in_amr_or_a_configured_acr(idp: LocalIssuer) -> None:
    """Identity providers say "second factor" either with RFC 8176 `amr` values or with an
    assurance level in `acr`; only levels the deployment names count, and a password is never MFA."""
    strong = "urn:hospital:loa:mfa"
    verifier = TokenVerifier(idp.url, "dicomsafe", idp.jwks_url, mfa_acr=frozenset({strong}), remember_s=0)
    plain = TokenVerifier(idp.url, "dicomsafe", idp.jwks_url, remember_s=0)

    def mfa(v: TokenVerifier, amr: list[str], acr: str | None = None) -> bool:
        return v.verify(idp.token("dr.house", amr=amr, extra={"acr": acr} if acr else None)).mfa

    assert mfa(verifier, ["pwd"], strong)
    assert not mfa(plain, ["pwd"], strong)  # an acr nobody configured means nothing
    assert not mfa(verifier, ["pwd"], "urn:hospital:loa:pwd")
    assert not mfa(verifier, ["pwd"])
    assert mfa(plain, ["pwd", "hwk"])
