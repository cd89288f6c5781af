"""Service-to-service transport security against running services (issue #7, #5):
TLS 1.3 only, mutual TLS, and per-RPC authorisation of the calling service's identity."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from dicomsafe.common.grpc_runtime import new_channel
from dicomsafe.common.kafka import Topics, ensure_topics, topic_specs
from dicomsafe.common.tls import TlsConfig
from dicomsafe.v1 import authz_pb2, authz_pb2_grpc, crypto_pb2, crypto_pb2_grpc
from services.authz.app import run as run_authz
from services.authz.config import AuthzConfig
from services.crypto.app import run as run_crypto
from tests.servers import Servers
from tests.service_runner import crypto_config, running
from tools import vault_setup
from tools.pki import Pki, make_pki
from tools.ports import free_port
from tools.stack import POLICY_FILE

# One study id for the Check requests; nothing here is about the decision itself.
CHECK = authz_pb2.CheckRequest(
    subject=authz_pb2.Subject(id="dr.house"),
    action="instance.read",
    resource=authz_pb2.Resource(type="instance", study_instance_uid="1.2.3", object_id="ab" * 16),
    context={"purpose": "treatment"},
)


@pytest.fixture
async def authz(
    pki: Pki, servers: Servers, unique: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[str, str]]:
    """authz as deployed: its own certificate, its production allowlist, and a plaintext
    health-only port for probes. Yields (TLS target, plaintext health target)."""
    topics = Topics(f"t{unique}.")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=1))
    health_bind = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("GRPC_HEALTH_BIND", health_bind)
    cfg = AuthzConfig(
        f"127.0.0.1:{free_port()}", POLICY_FILE, servers.kafka_bootstrap, topics.prefix, tls=pki.tls("authz")
    )
    async with running(lambda stop: run_authz(cfg, stop), cfg.grpc_bind, pki.tls("gateway")):
        yield cfg.grpc_bind, health_bind


def _handshake(target: str, tls: TlsConfig, max_version: ssl.TLSVersion) -> str:
    """A stdlib TLS client (OpenSSL, not grpc's BoringSSL) presenting a valid client
    certificate; returns the negotiated version."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = max_version
    ctx.load_verify_locations(cafile=tls.ca_file)
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    ctx.set_alpn_protocols(["h2"])
    host, port = target.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as conn,
    ):
        return str(conn.version())


async def _check(target: str, tls: TlsConfig) -> authz_pb2.CheckResponse:
    async with new_channel(target, tls) as channel:
        return await authz_pb2_grpc.AuthzServiceStub(channel).Check(CHECK, timeout=20)


async def test_tls12_is_refused_and_tls13_negotiated(authz: tuple[str, str], pki: Pki) -> None:
    target, _ = authz
    assert await asyncio.to_thread(_handshake, target, pki.tls("gateway"), ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
    with pytest.raises(ssl.SSLError) as refused:
        await asyncio.to_thread(_handshake, target, pki.tls("gateway"), ssl.TLSVersion.TLSv1_2)
    # Refused for the protocol version (no TLS 1.2 suite to agree on), not for the certificate.
    assert not isinstance(refused.value, ssl.SSLCertVerificationError)


async def test_a_call_without_a_client_certificate_is_refused(authz: tuple[str, str], pki: Pki) -> None:
    target, _ = authz
    assert (await _check(target, pki.tls("gateway"))).decision_id  # the same call with a certificate works
    server_only = grpc.ssl_channel_credentials(root_certificates=pki.ca_file.read_bytes())
    async with grpc.aio.secure_channel(target, server_only) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await authz_pb2_grpc.AuthzServiceStub(channel).Check(CHECK, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake itself failed


async def test_a_certificate_from_another_ca_is_refused(authz: tuple[str, str], pki: Pki, tmp_path: Path) -> None:
    target, _ = authz
    stranger = make_pki(tmp_path / "other-ca", ["gateway"]).tls("gateway")  # right name, wrong CA
    forged = TlsConfig(stranger.cert_file, stranger.key_file, pki.ca_file)  # still trusts our server
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _check(target, forged)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_authz_check_only_for_allowed_identities(authz: tuple[str, str], pki: Pki) -> None:
    target, _ = authz
    refusals = ("dicomsafe_grpc_refused_total", {"method": "/dicomsafe.v1.AuthzService/Check", "reason": "identity"})
    before = REGISTRY.get_sample_value(*refusals) or 0.0
    for allowed in ("gateway", "audit", "ops"):
        assert (await _check(target, pki.tls(allowed))).decision_id, allowed
    for refused in ("ingest", "crypto", "viewer"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _check(target, pki.tls(refused))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, refused
        assert err.value.details() == f"caller '{refused}' may not call Check"
    assert REGISTRY.get_sample_value(*refusals) == before + 3  # what an SRE alert watches


async def test_a_certificate_without_an_identity_is_refused(authz: tuple[str, str], pki: Pki) -> None:
    target, _ = authz
    nameless = pki.issue("nameless", uris=[])
    foreign = pki.issue("foreign", uris=["spiffe://elsewhere/gateway"])
    for tls in (nameless, foreign):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _check(target, tls)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.value.details() == "caller 'no service identity' may not call Check"


async def test_the_plaintext_health_port_answers_health_only(authz: tuple[str, str]) -> None:
    _, health_target = authz
    async with grpc.aio.insecure_channel(health_target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await authz_pb2_grpc.AuthzServiceStub(channel).Check(CHECK, timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == "Check requires mutual TLS 1.3"


async def test_crypto_rpcs_follow_least_privilege(pki: Pki, servers: Servers, tmp_path: Path, unique: str) -> None:
    """crypto with its production allowlist: PrepareSeal from ingest and the gateway, Open/Describe from the gateway,
    key administration from ops — and each refused to everyone else."""
    topics = Topics(f"t{unique}.")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=1))
    creds = vault_setup.provision(servers.vault_addr, servers.vault_token)
    base = crypto_config(servers.kafka_bootstrap, servers.vault_addr, creds, tmp_path / "store", topics.prefix)
    cfg = dataclasses.replace(base, tls=pki.tls("crypto"))  # and the production allowlist
    describe = crypto_pb2.DescribeRequest(object_id="cd" * 32)

    async def describe_as(identity: str) -> grpc.StatusCode:
        async with new_channel(cfg.grpc_bind, pki.tls(identity)) as channel:
            try:
                await crypto_pb2_grpc.CryptoServiceStub(channel).Describe(describe, timeout=20)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

    async def key_status_as(identity: str) -> grpc.StatusCode:
        async with new_channel(cfg.grpc_bind, pki.tls(identity)) as channel:
            try:
                await crypto_pb2_grpc.CryptoServiceStub(channel).GetKeyStatus(crypto_pb2.KeyStatusRequest(), timeout=20)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

    async def prepare_as(identity: str) -> grpc.StatusCode:
        async with new_channel(cfg.grpc_bind, pki.tls(identity)) as channel:
            try:
                # No object at all: an authorised caller gets INVALID_ARGUMENT from the servicer.
                await crypto_pb2_grpc.CryptoServiceStub(channel).PrepareSeal(
                    crypto_pb2.PrepareSealRequest(), timeout=20
                )
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

    denied = grpc.StatusCode.PERMISSION_DENIED
    async with running(lambda stop: run_crypto(cfg, stop), cfg.grpc_bind, pki.tls("ops")):
        assert await describe_as("gateway") == grpc.StatusCode.NOT_FOUND  # allowed: reaches the servicer
        assert [await describe_as(i) for i in ("ingest", "ops", "authz", "viewer")] == [denied] * 4
        assert await key_status_as("ops") == grpc.StatusCode.OK
        assert [await key_status_as(i) for i in ("gateway", "ingest")] == [denied] * 2
        # Seal keys for the two processes that store (ingest from the topic, the gateway for STOW-RS).
        for allowed in ("ingest", "gateway"):
            assert await prepare_as(allowed) == grpc.StatusCode.INVALID_ARGUMENT  # the servicer judged it
        assert [await prepare_as(i) for i in ("ops", "authz", "viewer")] == [denied] * 3


async def test_a_renewed_server_certificate_is_served_without_a_restart(
    pki: Pki, servers: Servers, unique: str, tmp_path: Path
) -> None:
    """cert-manager rewrites the Secret's files before expiry; new connections get the new one."""
    topics = Topics(f"t{unique}.")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=1))
    own = Pki(tmp_path)  # the session CA, but authz's files in a folder of its own
    for name in ("ca.crt", "ca.key"):
        (tmp_path / name).write_bytes((pki.directory / name).read_bytes())
    own.issue("authz")
    cfg = AuthzConfig(
        f"127.0.0.1:{free_port()}", POLICY_FILE, servers.kafka_bootstrap, topics.prefix, tls=own.tls("authz")
    )

    def served_serial() -> int:
        ctx = pki.tls("gateway").client_ssl_context()
        ctx.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", int(cfg.grpc_bind.rsplit(":", 1)[1])), timeout=10)
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as conn:  # closes raw too
            der = conn.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    async with running(lambda stop: run_authz(cfg, stop), cfg.grpc_bind, pki.tls("gateway")):
        before = await asyncio.to_thread(served_serial)
        own.issue("authz")  # renewal: new key and certificate, same names
        after = await asyncio.to_thread(served_serial)
        assert after != before
        assert (await _check(cfg.grpc_bind, pki.tls("gateway"))).decision_id  # and it still serves gRPC
