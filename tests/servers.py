"""Which real servers the tests talk to.

Each server is resolved on its own, in this order:
1. named by environment variables (a real cluster): KAFKA_BOOTSTRAP, VAULT_ADDR + VAULT_TOKEN, MONGODB_URI,
   S3_ENDPOINT_URL + S3_ACCESS_KEY_ID + S3_SECRET_ACCESS_KEY (any S3 API: SeaweedFS, MinIO, Ceph RGW, AWS);
2. a testcontainers container when a Docker engine answers;
3. the project's local servers (``tools.infra``), installed and started on loopback.
Whatever this module started, it stops at the end of the session.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from tools import infra

# Images the testcontainers modules are built around: their KafkaContainer configures
# Confluent's image (KRaft from 7.0), VaultContainer the Vault dev server, MongoDbContainer
# the official image with a root user (so role enforcement is testable there too).
KAFKA_IMAGE = "confluentinc/cp-kafka:7.6.0"
VAULT_IMAGE = "hashicorp/vault:1.18"
MONGO_IMAGE = "mongo:8.0"
# testcontainers' MinIO module needs the minio client package; the plain container does not.
MINIO_IMAGE = "minio/minio:RELEASE.2025-09-07T16-13-09Z"


@dataclass(frozen=True)
class S3Endpoint:
    endpoint_url: str
    access_key_id: str
    # Kept out of repr: the Servers object is printed in failing test reports.
    secret_access_key: str = field(repr=False)
    region: str = "us-east-1"


@dataclass(frozen=True)
class Servers:
    kafka_bootstrap: str
    vault_addr: str
    vault_token: str
    mongodb_uri: str
    s3: S3Endpoint
    # How each was obtained ("env", "container", "local"), shown in the test report header.
    origin: dict[str, str]


def _docker_available() -> bool:
    if os.environ.get("DICOMSAFE_NO_DOCKER"):
        return False
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=3)
        return bool(client.ping())
    except Exception:
        return False


def _kafka_container(stack: ExitStack) -> str:
    from testcontainers.kafka import KafkaContainer

    container: Any = stack.enter_context(KafkaContainer(KAFKA_IMAGE).with_kraft())
    return str(container.get_bootstrap_server())


def _vault_container(stack: ExitStack) -> tuple[str, str]:
    from testcontainers.vault import VaultContainer

    container: Any = stack.enter_context(VaultContainer(VAULT_IMAGE))
    return str(container.get_connection_url()), str(container.root_token)


def _mongo_container(stack: ExitStack) -> str:
    from testcontainers.mongodb import MongoDbContainer

    container: Any = stack.enter_context(MongoDbContainer(MONGO_IMAGE))
    return str(container.get_connection_url())


def _s3_container(stack: ExitStack) -> S3Endpoint:
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.wait_strategies import HttpWaitStrategy

    user, password = "dicomsafe", secrets.token_urlsafe(24)
    container: Any = stack.enter_context(
        DockerContainer(MINIO_IMAGE, _wait_strategy=HttpWaitStrategy(9000, "/minio/health/live"))
        .with_exposed_ports(9000)
        .with_env("MINIO_ROOT_USER", user)
        .with_env("MINIO_ROOT_PASSWORD", password)
        .with_command("server /data --address :9000")
    )
    url = f"http://{container.get_container_host_ip()}:{container.get_exposed_port(9000)}"
    return S3Endpoint(url, user, password)


def resolve(stack: ExitStack) -> Servers:
    origin: dict[str, str] = {}
    local_needed: list[str] = []
    docker = _docker_available()

    kafka = os.environ.get("KAFKA_BOOTSTRAP", "")
    if kafka:
        origin["kafka"] = "env"
    elif docker:
        kafka, origin["kafka"] = _kafka_container(stack), "container"
    else:
        local_needed.append("kafka")

    vault_addr, vault_token = os.environ.get("VAULT_ADDR", ""), os.environ.get("VAULT_TOKEN", "")
    if vault_addr and vault_token:
        origin["vault"] = "env"
    elif docker:
        (vault_addr, vault_token), origin["vault"] = _vault_container(stack), "container"
    else:
        local_needed.append("vault")

    mongo = os.environ.get("MONGODB_URI", "")
    if mongo:
        origin["mongo"] = "env"
    elif docker:
        mongo, origin["mongo"] = _mongo_container(stack), "container"
    else:
        local_needed.append("mongo")

    s3_env = (
        os.environ.get("S3_ENDPOINT_URL", ""),
        os.environ.get("S3_ACCESS_KEY_ID", ""),
        os.environ.get("S3_SECRET_ACCESS_KEY", ""),
    )
    s3: S3Endpoint | None = None
    if all(s3_env):
        s3, origin["s3"] = S3Endpoint(*s3_env, region=os.environ.get("S3_REGION") or "us-east-1"), "env"
    elif docker:
        s3, origin["s3"] = _s3_container(stack), "container"
    else:
        local_needed.append("s3")

    if local_needed:
        already_running = set(infra.running())
        local = infra.up(local_needed)
        to_stop = [name for name in local_needed if name not in already_running]
        stop: Callable[[], None] = lambda: infra.down(to_stop) if to_stop else None  # noqa: E731
        if not os.environ.get("DICOMSAFE_KEEP_SERVERS"):
            stack.callback(stop)
        for name in local_needed:
            origin[name] = "local"
        kafka = kafka or local.kafka_bootstrap
        if "vault" in local_needed:
            vault_addr, vault_token = local.vault_addr, local.vault_token
        mongo = mongo or local.mongodb_uri
        if "s3" in local_needed:
            s3 = S3Endpoint(
                local.s3_endpoint_url, local.s3_access_key_id, local.s3_secret_access_key, region=infra.S3_REGION
            )
    assert s3 is not None
    return Servers(kafka, vault_addr, vault_token, mongo, s3, origin)
