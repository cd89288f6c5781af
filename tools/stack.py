"""Run the dicomsafe services as separate processes on loopback, as a deployment would.

Used by the demo (`make run`) and the end-to-end tests. Each service gets only the
settings it needs: the crypto service alone holds a Vault identity (an AppRole, never the
admin token), and logs go to one file per service.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.audit.provision import provision, writer_uri

REPO = Path(__file__).resolve().parent.parent
POLICY_FILE = REPO / "deploy" / "policy" / "policy.toml"


@dataclass(frozen=True)
class StackSettings:
    kafka_bootstrap: str
    vault_addr: str
    mongodb_uri: str
    vault_role_id_file: Path
    vault_secret_id_file: Path
    work_dir: Path
    topic_prefix: str = ""
    base_port: int = 50051
    audit_db: str = "dicomsafe_audit"

    def port(self, service: str) -> int:
        return self.base_port + SERVICES.index(service)

    def target(self, service: str) -> str:
        return f"127.0.0.1:{self.port(service)}"


# Start order: dependencies first (audit consumes what others emit; ingest needs crypto).
SERVICES = ("crypto", "authz", "audit", "gateway", "ingest")


def service_env(s: StackSettings, service: str) -> dict[str, str]:
    common = {
        "KAFKA_BOOTSTRAP": s.kafka_bootstrap,
        "KAFKA_TOPIC_PREFIX": s.topic_prefix,
        "LOG_LEVEL": "INFO",
    }
    bind = s.target(service)
    specific: dict[str, dict[str, str]] = {
        "crypto": {
            "CRYPTO_GRPC_BIND": bind,
            "CRYPTO_STORE_DIR": str(s.work_dir / "store"),
            "VAULT_ADDR": s.vault_addr,
            "VAULT_ROLE_ID_FILE": str(s.vault_role_id_file),
            "VAULT_SECRET_ID_FILE": str(s.vault_secret_id_file),
        },
        "authz": {"AUTHZ_GRPC_BIND": bind, "AUTHZ_POLICY_FILE": str(POLICY_FILE)},
        "audit": {
            "AUDIT_GRPC_BIND": bind,
            # The insert/find-only writer provisioned by Stack.start, never the admin URI.
            "MONGODB_URI_FILE": str(s.work_dir / "secrets" / "audit-mongodb-uri"),
            "AUDIT_MONGODB_DB": s.audit_db,
            "AUDIT_GROUP_ID": f"{s.topic_prefix}dicomsafe-audit",
        },
        "gateway": {
            "GATEWAY_GRPC_BIND": bind,
            "GATEWAY_AUTHZ_TARGET": s.target("authz"),
            "GATEWAY_CRYPTO_TARGET": s.target("crypto"),
        },
        "ingest": {
            "INGEST_HEALTH_BIND": bind,
            "INGEST_CRYPTO_TARGET": s.target("crypto"),
            "INGEST_GROUP_ID": f"{s.topic_prefix}dicomsafe-ingest",
        },
    }
    # A clean environment: no inherited Vault token or Mongo admin URI leaks into a service.
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH")}
    return {**base, **common, **specific[service]}


@dataclass
class Stack:
    settings: StackSettings
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def log_file(self, service: str) -> Path:
        return self.settings.work_dir / "logs" / f"{service}.log"

    def start(self, services: tuple[str, ...] = SERVICES, timeout_s: float = 60.0) -> None:
        (self.settings.work_dir / "logs").mkdir(parents=True, exist_ok=True)
        if "audit" in services:
            self._provision_audit()
        for name in services:
            with self.log_file(name).open("ab") as log:
                self.processes[name] = subprocess.Popen(
                    [sys.executable, "-m", f"services.{name}"],
                    cwd=REPO,
                    env=service_env(self.settings, name),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        for name in services:
            self.wait_healthy(name, timeout_s)

    def _provision_audit(self) -> None:
        s = self.settings
        user, password = asyncio.run(provision(s.mongodb_uri, s.audit_db))
        secret = s.work_dir / "secrets" / "audit-mongodb-uri"
        secret.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(writer_uri(s.mongodb_uri, s.audit_db, user, password))

    def wait_healthy(self, service: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            proc = self.processes[service]
            if proc.poll() is not None:
                raise RuntimeError(f"{service} exited with {proc.returncode}; see {self.log_file(service)}")
            if asyncio.run(_serving(self.settings.target(service))):
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


async def _serving(target: str) -> bool:
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            request = health_pb2.HealthCheckRequest(service="")
            reply = await health_pb2_grpc.HealthStub(channel).Check(request, timeout=1.0)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
