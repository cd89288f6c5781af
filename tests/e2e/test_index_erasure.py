"""GDPR erasure reaches the gateway's study index, every service its own process on real servers.

A patient's studies are stored over STOW-RS and found over QIDO-RS; the erasure tool destroys the
patient's key and publishes `PatientErased` on `dicom.erased`; the gateway's indexer deletes the
patient's entries, so QIDO-RS no longer finds them and the index database holds nothing of the
patient's name or ID. Another patient's study stays. A stale `dicom.stored` event of an erased
instance, redelivered after the erasure, does not bring the entry back.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import FileDataset
from pydicom.uid import generate_uid
from pymongo import AsyncMongoClient

from dicomsafe.common.kafka import Topics
from dicomsafe.v1 import events_pb2
from tests.dicomweb_session import gateway_client
from tests.topic_reader import read_to_end
from tools import dicom_samples, vault_setup
from tools.erase_patient import ErasureRequest, erase_patient
from tools.oidc_issuer import LocalIssuer
from tools.stack import Stack

ISSUER = "HOSP-E2E"


def _patient_studies(tag: str) -> tuple[str, str, list[FileDataset]]:
    """Two studies (CT with two instances, MR) of a patient whose name and ID appear nowhere else."""
    patient_id, name = f"ERASE-{tag}", f"ERASED^{tag.upper()}"
    ct_study, mr_study = generate_uid(), generate_uid()
    datasets = [
        *(dicom_samples.ct_image(study_uid=ct_study, seed=i, rows=32, columns=32) for i in range(2)),
        dicom_samples.mr_image(study_uid=mr_study, seed=3, rows=32, columns=32),
    ]
    for ds in datasets:
        ds.PatientID, ds.PatientName, ds.IssuerOfPatientID = patient_id, name, ISSUER
    return patient_id, name, datasets


def _studies(client: DICOMwebClient, **filters: str) -> set[str]:
    return {str(s["0020000D"]["Value"][0]) for s in client.search_for_studies(search_filters=filters)}


async def _index_documents(stack: Stack) -> list[dict[str, Any]]:
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(stack.settings.mongodb_uri)
    try:
        db = mongo[stack.settings.index_db]
        return [doc for name in ("studies", "series", "instances") async for doc in db[name].find({})]
    finally:
        await mongo.close()


async def _replay_after_erasure(stack: Stack, sop_uids: set[str]) -> None:
    """Publish the erased instances' stored events again (a late redelivery) and wait until the
    gateway's indexer has committed past them."""
    topics = Topics(stack.settings.topic_prefix)
    stale = [
        v
        for v in await read_to_end(stack.settings.kafka_bootstrap, topics.stored)
        if events_pb2.StoredEvent.FromString(v).sop_instance_uid in sop_uids
    ]
    assert len(stale) == len(sop_uids)
    producer = AIOKafkaProducer(bootstrap_servers=stack.settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        sent = [await producer.send_and_wait(topics.stored, v) for v in stale]
    finally:
        await producer.stop()
    group = f"{stack.settings.topic_prefix}dicomsafe-gateway-index"
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.settings.kafka_bootstrap)
    await admin.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            committed = await admin.list_consumer_group_offsets(group)
            if all(
                (c := committed.get(TopicPartition(m.topic, m.partition))) is not None and c.offset > m.offset
                for m in sent
            ):
                return
            assert time.monotonic() < deadline, "the indexer did not get past the replayed events"
            await asyncio.sleep(0.5)
    finally:
        await admin.close()


def test_erased_patient_leaves_the_study_index(stack: Stack, idp: LocalIssuer) -> None:
    tag = uuid.uuid4().hex[:10]
    patient_id, name, datasets = _patient_studies(tag)
    erased_studies = {str(ds.StudyInstanceUID) for ds in datasets}
    other = dicom_samples.ct_image(study_uid=generate_uid(), seed=9, rows=32, columns=32)
    other.PatientID, other.IssuerOfPatientID = f"KEEP-{tag}", ISSUER
    stored = gateway_client(stack, idp.token("tech.jane")).store_instances([*datasets, other])
    assert "FailedSOPSequence" not in stored

    house = gateway_client(stack, idp.token("dr.house"))
    assert _studies(house, PatientID=patient_id) == erased_studies
    assert _studies(house, PatientName="erased^*") >= erased_studies
    documents = [d for d in asyncio.run(_index_documents(stack)) if patient_id in str(d)]
    assert documents and all(d.get("patient_ref") for d in documents)  # the pseudonym on every entry

    officer = vault_setup.erasure_officer_token(stack.settings.vault_addr, stack.settings.vault_admin_token)
    topics = Topics(stack.settings.topic_prefix)

    def erase() -> str:
        request = ErasureRequest(idp.token("dpo.lee"), patient_id, ISSUER, "GDPR art. 17 request #7")
        return asyncio.run(
            erase_patient(
                request,
                stack.settings.vault_addr,
                officer,
                stack.settings.target("authz"),
                stack.settings.client_tls("ops"),
                stack.settings.kafka_bootstrap,
                topics,
            )
        )

    ref = erase()
    assert {d["patient_ref"] for d in documents} == {ref}
    deadline = time.monotonic() + 60
    while _studies(house, PatientID=patient_id):
        assert time.monotonic() < deadline, "QIDO-RS still finds the erased patient's studies"
        time.sleep(0.5)
    for study in erased_studies:
        assert _studies(house, StudyInstanceUID=study) == set()
    assert _studies(house, PatientName="erased^*").isdisjoint(erased_studies)
    assert _studies(house, PatientID=f"KEEP-{tag}") == {str(other.StudyInstanceUID)}

    # A late redelivery of the erased instances' stored events does not index them again.
    asyncio.run(_replay_after_erasure(stack, {str(ds.SOPInstanceUID) for ds in datasets}))
    assert _studies(house, PatientID=patient_id) == set()
    # Nothing of the patient is left in the index database, at any level.
    left = asyncio.run(_index_documents(stack))
    assert not [d for d in left if patient_id in str(d) or name in str(d) or d.get("patient_ref") == ref]
    assert any(f"KEEP-{tag}" in str(d) for d in left)

    # Running the erasure again is harmless and announces it again (the index deletion is idempotent).
    assert erase() == ref
    events = [
        events_pb2.PatientErased.FromString(v)
        for v in asyncio.run(read_to_end(stack.settings.kafka_bootstrap, topics.erased))
    ]
    mine = [e for e in events if e.patient_ref == ref]
    assert len(mine) == 2 and len({e.request_id for e in mine}) == 2 and all(e.erased_at.seconds for e in mine)
    raw = asyncio.run(read_to_end(stack.settings.kafka_bootstrap, topics.erased))
    assert not [v for v in raw if patient_id.encode() in v or name.encode() in v]  # the pseudonym only
