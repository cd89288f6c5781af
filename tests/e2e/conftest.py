"""Shared end-to-end fixtures: every service as its own process against the real servers."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomsafe.common.kafka import Topics, ensure_topics, topic_specs
from tests.servers import Servers
from tools.oidc_issuer import LocalIssuer
from tools.stack import Stack, StackSettings, free_base_port


@pytest.fixture(scope="module")
def stack(
    servers: Servers, idp: LocalIssuer, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    """A test module with ``DIMSE_PEERS`` (entries of services/ingest/dimse_peers.py) gets
    ingest's DIMSE listener with those peers; one with ``CORS_ORIGINS`` gets a gateway that
    answers those browser origins too."""
    work: Path = tmp_path_factory.mktemp("stack")
    peers = getattr(request.module, "DIMSE_PEERS", None)
    peers_file = None
    if peers is not None:
        peers_file = work / "dimse-peers.json"
        peers_file.write_text(json.dumps({"peers": peers}))
    unique = uuid.uuid4().hex[:8]
    topics = Topics(prefix=f"e2e{unique}.")
    asyncio.run(ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=3)))
    settings = StackSettings(
        kafka_bootstrap=servers.kafka_bootstrap,
        vault_addr=servers.vault_addr,
        mongodb_uri=servers.mongodb_uri,
        vault_admin_token=servers.vault_token,
        work_dir=work,
        topic_prefix=topics.prefix,
        base_port=free_base_port(),
        audit_db=f"e2e_audit_{unique}",
        authz_db=f"e2e_authz_{unique}",
        index_db=f"e2e_index_{unique}",
        oidc_issuer=idp.url,
        oidc_jwks_url=idp.jwks_url,
        # Every e2e instance is far smaller; low enough that a 413 costs a few MiB, not 256.
        gateway_max_instance_bytes=2 * 1024 * 1024,
        # Every other e2e response is smaller, so authenticated before its status; the streamed
        # path is taken by the one test that stores a larger instance on purpose.
        gateway_verify_before_send_bytes=512 * 1024,
        dimse_peers_file=peers_file,
        cors_origins=tuple(getattr(request.module, "CORS_ORIGINS", ())),
    )
    running = Stack(settings)
    try:
        running.start()
        yield running
    finally:
        codes = running.stop()
        assert all(code == 0 for code in codes.values()), f"unclean service exit: {codes}"
