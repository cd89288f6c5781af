"""Which real servers the tests talk to.

Each server is resolved on its own, in this order:
1. named by environment variables (a real cluster): KAFKA_BOOTSTRAP, VAULT_ADDR + VAULT_TOKEN, MONGODB_URI;
2. a testcontainers container when a Docker engine answers;
3. the project's local servers (``tools.infra``), installed and started on loopback.
Whatever this module started, it stops at the end of the session.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from tools import infra

# Images the testcontainers modules are built around: their KafkaContainer configures
# Confluent's image (KRaft from 7.0), VaultContainer the Vault dev server, MongoDbContainer
# the official image with a root user (so role enforcement is testable there too).
KAFKA_IMAGE = "confluentinc/cp-kafka:7.6.0"
VAULT_IMAGE = "hashicorp/vault:1.18"
MONGO_IMAGE = "mongo:8.0"


@dataclass(frozen=True)
class Servers:
    kafka_bootstrap: str
    vault_addr: str
    vault_token: str
    mongodb_uri: str
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
    return Servers(kafka, vault_addr, vault_token, mongo, origin)
