"""Two replicas each of crypto, ingest and gateway against one S3 store and one index, as two
pods of each Deployment would run on different nodes: what one replica stored the other serves,
the ingest and indexer consumers share their topics (each instance sealed and indexed once),
and when one gateway goes away the other takes over its partitions and its callers."""

from __future__ import annotations

import asyncio
import io
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pymongo import AsyncMongoClient

from dicomsafe.storage.object_store import StoreSettings, open_store
from tests.dicomweb_session import gateway_client
from tests.own_site import instances, publish, site_settings, wado_uri
from tests.servers import Servers
from tests.service_runner import TEST_BUCKET, s3_settings
from tools import dicom_samples
from tools.oidc_issuer import LocalIssuer
from tools.stack import Stack

PER_GATEWAY = 4
INGESTED = 30


@pytest.fixture
def two_of_each(servers: Servers, idp: LocalIssuer, tmp_path: Path) -> Iterator[Stack]:
    settings = site_settings(
        servers,
        idp,
        tmp_path,
        "scale",
        crypto_store_url=f"s3://{TEST_BUCKET}/scale-{uuid.uuid4().hex[:8]}",
        s3=s3_settings(servers.s3),
    )
    stack = Stack(settings)
    try:
        stack.start()
        # Replica 1 of the byte path: gateway 1 stores through ingest 1 and crypto 1, and opens
        # through crypto 1; the ingest replicas share dicom.ingest as one consumer group.
        stack.start_replica("crypto", 1)
        stack.start_replica("ingest", 1, peer_replica=1)
        stack.start_replica("gateway", 1, peer_replica=1)
        yield stack
    finally:
        codes = stack.stop()
    assert all(code == 0 for code in codes.values()), f"unclean service exit: {codes}"


def _stow(stack: Stack, replica: int, token: str, files: list[bytes]) -> None:
    client = gateway_client(stack, token, replica)
    response = client.store_instances([pydicom.dcmread(io.BytesIO(f)) for f in files])
    assert "FailedSOPSequence" not in response
    assert len(response.ReferencedSOPSequence) == len(files)


def _wado(stack: Stack, replica: int, token: str, data: bytes) -> bytes:
    got = wado_uri(stack.settings, token, data, replica)
    assert got.status_code == 200, got.text
    return got.content


async def _until_indexed(stack: Stack, sops: set[str], timeout_s: float = 120) -> dict[str, str]:
    """SOP Instance UID -> object id, once every one of ``sops`` is indexed."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(stack.settings.mongodb_uri)
    deadline = time.monotonic() + timeout_s
    try:
        instances = client[stack.settings.index_db]["instances"]
        while True:
            found = {str(d["_id"]): str(d["object_id"]) async for d in instances.find({}, {"object_id": 1})}
            if set(found) >= sops:
                return found
            assert time.monotonic() < deadline, f"{len(sops - set(found))} instances never indexed"
            await asyncio.sleep(0.5)
    finally:
        await client.close()


def test_two_crypto_and_two_gateway_replicas_share_one_store(two_of_each: Stack, idp: LocalIssuer) -> None:
    stack = two_of_each
    tech, house = idp.token("tech.jane"), idp.token("dr.house")

    # STOW-RS through each gateway (each sealing through its own ingest and crypto replica) ...
    via = {replica: instances(dicom_samples.ct_image, PER_GATEWAY, 100 * (replica + 1)) for replica in (0, 1)}
    for replica, files in via.items():
        _stow(stack, replica, tech, list(files.values()))
    # ... is served by the other, opened by the other crypto replica, byte for byte.
    for replica, files in via.items():
        for data in files.values():
            assert _wado(stack, 1 - replica, house, data) == data

    # Kafka ingest: the two gateways' indexers split dicom.stored (one consumer group), each
    # instance is indexed once, and either gateway serves any of them.
    ingested = instances(dicom_samples.ct_image, INGESTED, 1000)
    asyncio.run(publish(stack.settings, ingested.values()))
    index = asyncio.run(_until_indexed(stack, set(ingested)))
    for i, data in enumerate(ingested.values()):
        assert _wado(stack, i % 2, house, data) == data

    # One gateway pod goes away (SIGKILL: no leave-group); the other takes over its partitions
    # once the group notices, and serves everything stored before.
    gone = stack.processes.pop("gateway")
    gone.send_signal(signal.SIGKILL)
    gone.wait(timeout=30)
    later = instances(dicom_samples.ct_image, INGESTED // 3, 2000)
    asyncio.run(publish(stack.settings, later.values()))
    index = asyncio.run(_until_indexed(stack, set(ingested) | set(later), timeout_s=180))
    for data in [*via[0].values(), *later.values()]:
        assert _wado(stack, 1, house, data) == data

    # One sealed object per instance in the shared bucket: no replica stored one twice.
    every = {**via[0], **via[1], **ingested, **later}
    assert set(index) == set(every)
    assert stack.settings.s3 is not None
    store = open_store(StoreSettings(stack.settings.crypto_store_url, stack.settings.s3))
    assert sorted(store.object_ids()) == sorted(index.values())
