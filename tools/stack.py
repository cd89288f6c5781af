"""Run the dicomsafe services as separate processes on loopback, as a deployment would.

Used by the demo (`make run`) and the end-to-end tests. Each service gets only the
settings it needs: the crypto service alone holds a Vault identity (an AppRole, never the
admin token), and logs go to one file per service. gRPC between them is mutual TLS 1.3: a CA
made at start (``tools.pki``, in the run directory) gives every service its own certificate.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pymongo import AsyncMongoClient

from dicomsafe.common.grpc_runtime import new_channel
from dicomsafe.common.mongo_users import ensure_role_and_user, user_uri
from dicomsafe.common.tls import TlsConfig
from dicomsafe.common.tls13_pin import CIPHER_SUITES_VAR, TLS13_ONLY_CIPHER_SUITES
from dicomsafe.storage.object_store import S3Settings
from services.audit.provision import provision
from services.gateway.provision import provision_index
from tools import vault_setup
from tools.pki import Pki, make_pki

REPO = Path(__file__).resolve().parent.parent
POLICY_FILE = REPO / "deploy" / "policy" / "policy.toml"


@dataclass(frozen=True)
class StackSettings:
    kafka_bootstrap: str
    vault_addr: str
    # An admin token, used only here to provision each service's own narrow identity;
    # no service ever receives it.
    vault_admin_token: str
    mongodb_uri: str
    work_dir: Path
    topic_prefix: str = ""
    base_port: int = 50051
    audit_db: str = "dicomsafe_audit"
    # The identity provider authz verifies tokens against ("" = trust subject ids: development).
    oidc_issuer: str = ""
    oidc_jwks_url: str = ""

    index_db: str = "dicomsafe_index"
    authz_db: str = "dicomsafe_authz"
    # Largest STOW-RS part (the gateway's default; tests lower it to provoke 413 cheaply).
    gateway_max_instance_bytes: int = 256 * 1024 * 1024
    # Largest WADO response authenticated whole before its status (the gateway's default); tests
    # lower it so that a streamed response's integrity failure is cheap to provoke.
    gateway_verify_before_send_bytes: int = 64 * 1024 * 1024
    # Where crypto keeps sealed objects: "" = a directory in work_dir, or s3://bucket/prefix
    # on the S3 API of ``s3`` (its keys reach the service as files, like every secret here).
    crypto_store_url: str = ""
    s3: S3Settings | None = None
    # The archive tier (CRYPTO_ARCHIVE_STORE_URL, same S3 API and keys as the hot tier); "" = none.
    crypto_archive_url: str = ""
    # Object Lock days on the archive tier (its bucket is created with Object Lock when > 0).
    crypto_archive_retention_days: int = 0
    # ingest's DIMSE storage and the gateway's query/retrieve listeners, both with these peers
    # (dicomsafe/dimse/peers.py); None = off.
    dimse_peers_file: Path | None = None
    # Browser origins the gateway answers cross-origin (GATEWAY_CORS_ORIGINS): a served viewer's.
    cors_origins: tuple[str, ...] = ()

    @property
    def https_port(self) -> int:
        """The gateway's DICOMweb listener."""
        return self.https_port_of(0)

    def https_port_of(self, replica: int) -> int:
        return self.base_port + HTTPS_PORT_OFFSET + replica * REPLICA_PORT_STRIDE

    @property
    def dicomweb_url(self) -> str:
        return self.dicomweb_url_of(0)

    def dicomweb_url_of(self, replica: int) -> str:
        return f"https://127.0.0.1:{self.https_port_of(replica)}/dicomweb"

    @property
    def dimse_port(self) -> int:
        """ingest's DIMSE listener (replica 0)."""
        return self.port("ingest") + DIMSE_PORT_OFFSET

    @property
    def qr_port(self) -> int:
        """The gateway's DIMSE query/retrieve listener (replica 0)."""
        return self.port("gateway") + DIMSE_PORT_OFFSET

    @property
    def ca_file(self) -> Path:
        """The CA every certificate of the run comes from (gRPC and the DICOMweb listener)."""
        return self.pki.ca_file

    def port(self, service: str, replica: int = 0) -> int:
        if not 0 <= replica < MAX_REPLICAS:
            raise ValueError(f"replica {replica} outside 0..{MAX_REPLICAS - 1}")
        return self.base_port + SERVICES.index(service) + replica * REPLICA_PORT_STRIDE

    def target(self, service: str, replica: int = 0) -> str:
        return f"127.0.0.1:{self.port(service, replica)}"

    def metrics_url(self, service: str, replica: int = 0) -> str:
        return f"http://127.0.0.1:{self.port(service, replica) + METRICS_PORT_OFFSET}/metrics"

    @property
    def pki(self) -> Pki:
        return Pki(self.work_dir / "pki")

    def client_tls(self, identity: str) -> TlsConfig:
        """TLS material of a client identity ("ops", "viewer", or a service's own)."""
        return self.pki.tls(identity)


# Each service's /metrics listens this far above its gRPC port.
METRICS_PORT_OFFSET = 100
HTTPS_PORT_OFFSET = 200
DIMSE_PORT_OFFSET = 300
DIMSE_AE_TITLE = "DICOMSAFE"
QR_AE_TITLE = "DICOMSAFE_QR"
# The browser origin a development viewer is served from (GATEWAY_CORS_ORIGINS).
VIEWER_ORIGIN = "https://viewer.dicomsafe.test"
# The DICOMweb listener's certificate: same CA, no service identity (users are no services).
HTTPS_CERT = "gateway-https"

# Start order: dependencies first (audit consumes what others emit; ingest needs crypto).
SERVICES = ("crypto", "authz", "audit", "gateway", "ingest")
# Further replicas of a service (scale-out tests): replica r listens r * stride above replica 0
# on each of its ports (gRPC, metrics, HTTPS).
REPLICA_PORT_STRIDE = 10
MAX_REPLICAS = 3


def replica_name(service: str, replica: int) -> str:
    return service if replica == 0 else f"{service}-{replica}"


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_base_port() -> int:
    """A base port whose whole span (gRPC, metrics, HTTPS and DIMSE ports) is free now, below the
    ephemeral range: a port free when checked could otherwise be taken by any outgoing
    connection (Kafka, MongoDB, Vault clients) before the service binds it."""
    span = DIMSE_PORT_OFFSET + len(SERVICES) + (MAX_REPLICAS - 1) * REPLICA_PORT_STRIDE + 1
    top = min(40000, _ephemeral_low()) - span
    for _ in range(50):
        base = random.randint(20000, top)  # noqa: S311 - picks a port range, no secret
        try:
            for port in range(base, base + span):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port range")


def _store_env(s: StackSettings, archive_tier: bool) -> dict[str, str]:
    """The object store: crypto reads both tiers; ingest and the gateway, which seal what they
    store, put into the hot tier only."""
    archive = (
        {
            "CRYPTO_ARCHIVE_STORE_URL": s.crypto_archive_url,
            "CRYPTO_ARCHIVE_RETENTION_DAYS": str(s.crypto_archive_retention_days),
        }
        if s.crypto_archive_url and archive_tier
        else {}
    )
    if not s.crypto_store_url:
        return {"CRYPTO_STORE_DIR": str(s.work_dir / "store"), **archive}
    env = {"CRYPTO_STORE_URL": s.crypto_store_url, **archive}
    if s.s3 is not None:
        env |= {"S3_ENDPOINT_URL": s.s3.endpoint_url, "S3_REGION": s.s3.region}
        if s.s3.access_key_id:
            secrets_dir = s.work_dir / "secrets"
            env |= {
                "S3_ACCESS_KEY_ID_FILE": str(secrets_dir / "store-s3-access-key-id"),
                "S3_SECRET_ACCESS_KEY_FILE": str(secrets_dir / "store-s3-secret-access-key"),
            }
    return env


def service_env(s: StackSettings, service: str, replica: int = 0, peer_replica: int = 0) -> dict[str, str]:
    """``replica``: which replica of ``service`` (its ports); ``peer_replica``: the replica of
    crypto it talks to."""
    common = {
        "KAFKA_BOOTSTRAP": s.kafka_bootstrap,
        "KAFKA_TOPIC_PREFIX": s.topic_prefix,
        "LOG_LEVEL": "INFO",
        "METRICS_BIND": f"127.0.0.1:{s.port(service, replica) + METRICS_PORT_OFFSET}",
        CIPHER_SUITES_VAR: TLS13_ONLY_CIPHER_SUITES,
        **s.pki.env(service),
    }
    bind = s.target(service, replica)
    secrets_dir = s.work_dir / "secrets"
    specific: dict[str, dict[str, str]] = {
        "crypto": {
            "CRYPTO_GRPC_BIND": bind,
            **_store_env(s, archive_tier=True),
            "VAULT_ADDR": s.vault_addr,
            "VAULT_ROLE_ID_FILE": str(secrets_dir / "crypto-role-id"),
            "VAULT_SECRET_ID_FILE": str(secrets_dir / "crypto-secret-id"),
        },
        "authz": {
            "AUTHZ_GRPC_BIND": bind,
            "AUTHZ_POLICY_FILE": str(POLICY_FILE),
            "AUTHZ_OIDC_ISSUER": s.oidc_issuer,
            "AUTHZ_OIDC_JWKS_URL": s.oidc_jwks_url,
            "AUTHZ_MONGODB_URI_FILE": str(secrets_dir / "authz-mongodb-uri"),
            "AUTHZ_MONGODB_DB": s.authz_db,
        },
        "audit": {
            "AUDIT_GRPC_BIND": bind,
            # The insert/find-only writer provisioned by Stack.start, never the admin URI.
            "MONGODB_URI_FILE": str(secrets_dir / "audit-mongodb-uri"),
            "VAULT_ADDR": s.vault_addr,
            "VAULT_ROLE_ID_FILE": str(secrets_dir / "audit-role-id"),
            "VAULT_SECRET_ID_FILE": str(secrets_dir / "audit-secret-id"),
            "AUDIT_CHECKPOINT_INTERVAL_S": "2",
            "AUDIT_MONGODB_DB": s.audit_db,
            "AUDIT_GROUP_ID": f"{s.topic_prefix}dicomsafe-audit",
            "AUDIT_AUTHZ_TARGET": s.target("authz"),
        },
        "gateway": {
            "GATEWAY_GRPC_BIND": bind,
            "GATEWAY_AUTHZ_TARGET": s.target("authz"),
            "GATEWAY_CRYPTO_TARGET": s.target("crypto", peer_replica),
            **_store_env(s, archive_tier=False),
            "GATEWAY_HTTP_BIND": f"127.0.0.1:{s.https_port_of(replica)}",
            # Retrieve URLs and BulkDataURIs point here whatever Host a client sends
            # (dicomweb-client sends it without the port).
            "GATEWAY_PUBLIC_URL": s.dicomweb_url_of(replica),
            "GATEWAY_TLS_CERT_FILE": str(s.pki.directory / f"{HTTPS_CERT}.crt"),
            "GATEWAY_TLS_KEY_FILE": str(s.pki.directory / f"{HTTPS_CERT}.key"),
            "GATEWAY_MONGODB_URI_FILE": str(secrets_dir / "gateway-mongodb-uri"),
            "GATEWAY_INDEX_DATABASE": s.index_db,
            "GATEWAY_INDEX_GROUP_ID": f"{s.topic_prefix}dicomsafe-gateway-index",
            "GATEWAY_DEID_UID_KEY_FILE": str(secrets_dir / "gateway-deid-uid-key"),
            "GATEWAY_MAX_INSTANCE_BYTES": str(s.gateway_max_instance_bytes),
            "GATEWAY_VERIFY_BEFORE_SEND_BYTES": str(s.gateway_verify_before_send_bytes),
            "GATEWAY_CORS_ORIGINS": ",".join((VIEWER_ORIGIN, *s.cors_origins)),
            **(
                {
                    "GATEWAY_DIMSE_BIND": f"127.0.0.1:{s.port(service, replica) + DIMSE_PORT_OFFSET}",
                    "GATEWAY_DIMSE_AE_TITLE": QR_AE_TITLE,
                    "GATEWAY_DIMSE_PEERS_FILE": str(s.dimse_peers_file),
                    # Tests ask about instances that never arrive; a minute each would be long.
                    "GATEWAY_DIMSE_COMMITMENT_WAIT_S": "10",
                }
                if s.dimse_peers_file is not None
                else {}
            ),
        },
        "ingest": {
            "INGEST_GRPC_BIND": bind,
            "INGEST_CRYPTO_TARGET": s.target("crypto", peer_replica),
            **_store_env(s, archive_tier=False),
            "INGEST_GROUP_ID": f"{s.topic_prefix}dicomsafe-ingest",
            **(
                {
                    "INGEST_DIMSE_BIND": f"127.0.0.1:{s.port(service, replica) + DIMSE_PORT_OFFSET}",
                    "INGEST_DIMSE_AE_TITLE": DIMSE_AE_TITLE,
                    "INGEST_DIMSE_PEERS_FILE": str(s.dimse_peers_file),
                }
                if s.dimse_peers_file is not None
                else {}
            ),
        },
    }
    # A clean environment: no inherited Vault token or Mongo admin URI leaks into a service.
    base = {
        k: v
        for k, v in os.environ.items()
        if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH", "EVENT_LOOP")
    }
    return {**base, **common, **specific[service]}


@dataclass
class Stack:
    settings: StackSettings
    # By replica name: "gateway", "gateway-1", ...
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def log_file(self, service: str) -> Path:
        return self.settings.work_dir / "logs" / f"{service}.log"

    def start(self, services: tuple[str, ...] = SERVICES, timeout_s: float = 60.0) -> None:
        (self.settings.work_dir / "logs").mkdir(parents=True, exist_ok=True)
        if not self.settings.pki.ca_file.exists():  # restarts keep the CA their peers trust
            make_pki(self.settings.pki.directory).issue(HTTPS_CERT, uris=[])
        if "crypto" in services:
            self._provision_crypto()
        if "authz" in services:
            self._provision_authz()
        if "audit" in services:
            self._provision_audit()
        if "gateway" in services:
            self._provision_gateway()
        for name in services:
            self._spawn(name, service_env(self.settings, name))
        for name in services:
            self.wait_healthy(name, timeout_s)

    def start_replica(self, service: str, replica: int, peer_replica: int = 0, timeout_s: float = 60.0) -> str:
        """Another replica of a started service, on its own ports, sharing everything else (the
        topics and consumer groups, databases, object store, secrets): as a second pod of the same
        Deployment would. Returns its name in ``processes``."""
        name = replica_name(service, replica)
        self._spawn(name, service_env(self.settings, service, replica, peer_replica), service)
        self.wait_healthy(name, timeout_s)
        return name

    def _spawn(self, name: str, env: dict[str, str], service: str = "") -> None:
        with self.log_file(name).open("ab") as log:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", f"services.{service or name}"],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _secret(self, name: str, value: str) -> None:
        vault_setup.write_secret(self.settings.work_dir / "secrets" / name, value)

    def _provision_crypto(self) -> None:
        creds = vault_setup.provision(self.settings.vault_addr, self.settings.vault_admin_token)
        self._secret("crypto-role-id", creds.role_id)
        self._secret("crypto-secret-id", creds.secret_id)
        s3 = self.settings.s3
        if s3 is not None and s3.access_key_id:
            self._secret("store-s3-access-key-id", s3.access_key_id)
            self._secret("store-s3-secret-access-key", s3.secret_access_key or "")

    def _provision_audit(self) -> None:
        s = self.settings
        user, password = asyncio.run(provision(s.mongodb_uri, s.audit_db))
        self._secret("audit-mongodb-uri", user_uri(s.mongodb_uri, s.audit_db, user, password))
        creds = vault_setup.provision_audit(s.vault_addr, s.vault_admin_token)
        self._secret("audit-role-id", creds.role_id)
        self._secret("audit-secret-id", creds.secret_id)

    def _provision_authz(self) -> None:
        s = self.settings
        password = secrets.token_urlsafe(24)
        asyncio.run(_ensure_user(s.mongodb_uri, s.authz_db, "dicomsafe-authz", password, AUTHZ_DB_ACTIONS))
        self._secret("authz-mongodb-uri", user_uri(s.mongodb_uri, s.authz_db, "dicomsafe-authz", password))

    def _provision_gateway(self) -> None:
        s = self.settings
        user, password = asyncio.run(provision_index(s.mongodb_uri, s.index_db))
        self._secret("gateway-mongodb-uri", user_uri(s.mongodb_uri, s.index_db, user, password))
        self._secret("gateway-deid-uid-key", secrets.token_urlsafe(32))

    async def wait_indexed(self, study_uids: set[str], timeout_s: float = 60.0) -> None:
        """Until the gateway's indexer has every study: retrieval fails closed on unindexed studies
        (their sensitivity labels are not known yet). Reads the index with the admin connection."""
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            self.settings.mongodb_uri, serverSelectionTimeoutMS=10000
        )
        deadline = time.monotonic() + timeout_s
        try:
            studies = client[self.settings.index_db]["studies"]
            while True:
                found = {str(d["_id"]) async for d in studies.find({"_id": {"$in": sorted(study_uids)}}, {"_id": 1})}
                if found >= study_uids:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{len(study_uids - found)} studies not indexed after {timeout_s:.0f}s")
                await asyncio.sleep(0.3)
        finally:
            await client.close()

    def wait_healthy(self, service: str, timeout_s: float) -> None:
        """``service``: a replica name ("gateway", "gateway-1")."""
        base, _, replica = service.partition("-")
        target = self.settings.target(base, int(replica or 0))
        deadline = time.monotonic() + timeout_s
        while True:
            proc = self.processes[service]
            if proc.poll() is not None:
                raise RuntimeError(f"{service} exited with {proc.returncode}; see {self.log_file(service)}")
            if asyncio.run(serving(target, self.settings.client_tls("ops"))):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{service} not healthy after {timeout_s:.0f}s; see {self.log_file(service)}")
            time.sleep(0.3)

    def stop(self, services: tuple[str, ...] | None = None, timeout_s: float = 20.0) -> dict[str, int | None]:
        names = list(services or reversed(list(self.processes)))
        for name in names:
            proc = self.processes.get(name)
            if proc and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name in names:
            proc = self.processes.pop(name, None)
            if proc is None:
                continue
            try:
                codes[name] = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                codes[name] = proc.wait()
        return codes


# Grants are created, read and revoked (an update); never deleted, so expired grants stay reviewable.
AUTHZ_DB_ACTIONS = ("find", "insert", "update", "createIndex", "listIndexes", "listCollections")


async def _ensure_user(admin_uri: str, database: str, user: str, password: str, actions: tuple[str, ...]) -> None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(admin_uri, serverSelectionTimeoutMS=10000)
    try:
        await ensure_role_and_user(client, database, f"{user}-role", user, password, actions)
    finally:
        await client.close()


async def serving(target: str, tls: TlsConfig) -> bool:
    """Whether the gRPC health service at ``target`` answers SERVING (asked as ``tls``'s identity)."""
    async with new_channel(target, tls) as channel:
        try:
            request = health_pb2.HealthCheckRequest(service="")
            reply = await health_pb2_grpc.HealthStub(channel).Check(request, timeout=1.0)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
