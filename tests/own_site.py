"""What the end-to-end tests that run a site of their own share: its settings (topics and
databases of its own), generated instances, publishing them as a modality would, and reading
one back byte for byte over WADO-URI."""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pydicom
import requests
from pydicom.dataset import FileDataset

from dicomsafe.common.kafka import Topics, ensure_topics, headers_for, new_producer, topic_specs
from dicomsafe.v1 import events_pb2
from tests.servers import Servers
from tools import dicom_samples
from tools.oidc_issuer import LocalIssuer
from tools.stack import StackSettings, free_base_port


def site_settings(
    servers: Servers, idp: LocalIssuer, work: Path, name: str, *, partitions: int = 3, **changes: Any
) -> StackSettings:
    """A site on the shared servers with topics and databases of its own (``name`` + a random
    suffix); ``changes`` override any setting (its own MongoDB, an S3 store, ...)."""
    unique = uuid.uuid4().hex[:8]
    topics = Topics(f"{name}{unique}.")
    asyncio.run(ensure_topics(changes.get("kafka_bootstrap", servers.kafka_bootstrap), topic_specs(topics, partitions)))
    base: dict[str, Any] = {
        "kafka_bootstrap": servers.kafka_bootstrap,
        "vault_addr": servers.vault_addr,
        "vault_admin_token": servers.vault_token,
        "mongodb_uri": servers.mongodb_uri,
        "work_dir": work,
        "topic_prefix": topics.prefix,
        "base_port": free_base_port(),
        "audit_db": f"{name}_audit_{unique}",
        "authz_db": f"{name}_authz_{unique}",
        "index_db": f"{name}_index_{unique}",
        "oidc_issuer": idp.url,
        "oidc_jwks_url": idp.jwks_url,
    }
    return StackSettings(**(base | changes))


def instances(
    make: Callable[..., FileDataset], n: int, seed: int, *, size: int = 64, **attributes: str
) -> dict[str, bytes]:
    """``n`` instances of one new study (SOP Instance UID -> Part 10 bytes); ``attributes`` are set
    on each (PatientID=..., say)."""
    study = f"2.25.{uuid.uuid4().int}"
    out = {}
    for i in range(n):
        ds = make(study_uid=study, seed=seed + i, rows=size, columns=size)
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        out[str(ds.SOPInstanceUID)] = dicom_samples.to_bytes(ds)
    return out


async def publish(settings: StackSettings, files: Iterable[bytes], source: str = "e2e-modality") -> None:
    """Each file as an IngestRequest on the site's ingest topic, keyed by its request id."""
    producer = new_producer(settings.kafka_bootstrap, source)
    await producer.start()
    try:
        topic = Topics(settings.topic_prefix).ingest
        for data in files:
            req = events_pb2.IngestRequest(request_id=str(uuid.uuid4()), source=source, inline_instance=data)
            await producer.send(topic, req.SerializeToString(), key=req.request_id.encode(), headers=headers_for(req))
        await producer.flush()
    finally:
        await producer.stop()


def wado_uri(settings: StackSettings, token: str, data: bytes, replica: int = 0) -> requests.Response:
    """The stored instance of ``data`` (its UIDs) from gateway ``replica``, as application/dicom."""
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE would override the pinned CA
    query = {
        "requestType": "WADO",
        "studyUID": str(ds.StudyInstanceUID),
        "seriesUID": str(ds.SeriesInstanceUID),
        "objectUID": str(ds.SOPInstanceUID),
        "contentType": "application/dicom",
    }
    return session.get(
        f"{settings.dicomweb_url_of(replica)}/wado",
        params=query,
        headers={"Authorization": f"Bearer {token}"},
        verify=str(settings.ca_file),
        timeout=60,
    )
