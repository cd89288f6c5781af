"""The study index written in bulk (a STOW-RS request's instances, a batch of stored events), on a
real MongoDB-wire server and a real crypto service: add_many leaves exactly what add() of each entry
in turn leaves, merges what concurrent writers add to one study, undoes what an erasure covers,
and the indexer reads back through crypto only what is not indexed yet."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiokafka import ConsumerRecord
from pydicom.dataset import FileDataset
from pydicom.uid import generate_uid
from pymongo import AsyncMongoClient

from dicomsafe.common.grpc_runtime import new_channel
from dicomsafe.common.kafka import PermanentError, Topics, ensure_topics, topic_specs
from dicomsafe.storage.object_store import object_id_for
from dicomsafe.storage.sealer import Sealer
from dicomsafe.storage.store_fs import FileStore
from dicomsafe.v1 import crypto_pb2, crypto_pb2_grpc, events_pb2
from services.crypto.app import run as run_crypto
from services.gateway.deidentify import Deidentifier
from services.gateway.index_entry import IndexEntry, entry_for
from services.gateway.indexer import Indexer
from services.gateway.instance_layout import layout_of
from services.gateway.study_index import StudyIndex
from tests.servers import Servers
from tests.service_runner import TEST_CLIENT, crypto_config, running, with_tls
from tools import dicom_samples, vault_setup
from tools.pki import Pki

if TYPE_CHECKING:
    Stub = crypto_pb2_grpc.CryptoServiceAsyncStub

COLLECTIONS = ("studies", "series", "instances")
# Set by each write, so they differ between two databases written a moment apart.
WRITE_TIMES = ("indexed_at", "updated_at")
T0 = dt.datetime(2024, 3, 1, 12, tzinfo=dt.UTC)


@pytest.fixture
async def mongo(servers: Servers, unique: str) -> AsyncIterator[AsyncMongoClient[dict[str, Any]]]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(servers.mongodb_uri)
    try:
        yield client
    finally:
        for name in await client.list_database_names():
            if name.endswith(unique):
                await client.drop_database(name)
        await client.close()


def _entry(ds: FileDataset, patient_ref: str = "", stored_at: dt.datetime = T0, object_id: str = "") -> IndexEntry:
    data = dicom_samples.to_bytes(ds)
    parsed, layout = layout_of(data)
    object_id = object_id or hashlib.sha256(data).hexdigest()
    return entry_for(parsed, layout, object_id, len(data), patient_ref, stored_at)


def _in_series(series_uid: str, *datasets: FileDataset) -> list[FileDataset]:
    for ds in datasets:
        ds.SeriesInstanceUID = series_uid
    return list(datasets)


async def _documents(client: AsyncMongoClient[dict[str, Any]], database: str) -> dict[str, list[dict[str, Any]]]:
    """Each collection's documents without their write times, sets (labels, modalities) sorted."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name in COLLECTIONS:
        docs = [doc async for doc in client[database][name].find({}).sort("_id", 1)]
        for doc in docs:
            for field in WRITE_TIMES:
                doc.pop(field, None)
            for field in ("labels", "modalities"):
                if field in doc:
                    doc[field] = sorted(doc[field])
        out[name] = docs
    return out


async def test_add_many_leaves_what_add_in_turn_leaves(mongo: AsyncMongoClient[dict[str, Any]], unique: str) -> None:
    study, other_study = generate_uid(), generate_uid()
    ct = _in_series(
        generate_uid(), *(dicom_samples.ct_image(study_uid=study, seed=s, rows=16, columns=16) for s in (1, 2))
    )
    ct[1].ConfidentialityConstraintOnPatientDataDescription = "VIP patient"
    mr = _in_series(generate_uid(), dicom_samples.mr_image(study_uid=study, seed=3, rows=16, columns=16))
    mr[0].ConfidentialityConstraintOnPatientDataDescription = "psychiatry"
    elsewhere = dicom_samples.ct_image(study_uid=other_study, seed=4, rows=16, columns=16)
    # Indexed before, by another request: its label must survive the bulk write's union.
    earlier = dicom_samples.ct_image(study_uid=study, seed=5, rows=16, columns=16)
    earlier.ConfidentialityConstraintOnPatientDataDescription = "court order"
    prior = _entry(earlier, "ref-a")
    # Several studies and series in one call, and one instance twice (a part sent twice).
    batch = [_entry(ds, "ref-a") for ds in (*ct, *mr)] + [_entry(elsewhere, "ref-b")]
    batch.append(batch[0])

    pseudonyms = Deidentifier(b"k" * 32)
    one_by_one, bulk = StudyIndex(mongo, f"turn_{unique}", pseudonyms), StudyIndex(mongo, f"bulk_{unique}", pseudonyms)
    for index in (one_by_one, bulk):
        await index.ensure_indexes()
        await index.add(prior)
    for entry in batch:
        await one_by_one.add(entry)
    await bulk.add_many(batch)

    expected = await _documents(mongo, f"turn_{unique}")
    assert await _documents(mongo, f"bulk_{unique}") == expected
    studies = {doc["_id"]: doc for doc in expected["studies"]}
    assert studies[study]["labels"] == ["mental_health", "restricted", "vip"]
    assert studies[study]["modalities"] == ["CT", "MR"]
    assert studies[other_study]["labels"] == [] and studies[other_study]["modalities"] == ["CT"]
    assert len(expected["series"]) == 4 and len(expected["instances"]) == 5
    assert all(
        doc["pseudo_uid"] == pseudonyms.pseudonymous_uid(doc["_id"]) for docs in expected.values() for doc in docs
    )
    assert {located.sop_uid for located in await bulk.locate(study)} == {
        str(ds.SOPInstanceUID) for ds in (*ct, *mr, earlier)
    }

    await bulk.add_many(batch)  # redone (a retried request): nothing changes
    assert await _documents(mongo, f"bulk_{unique}") == expected
    assert await bulk.indexed([(batch[0].sop_uid, batch[0].object_id), (batch[1].sop_uid, "another object")]) == {
        (batch[0].sop_uid, batch[0].object_id)
    }


async def test_add_many_undoes_what_a_seen_erasure_covers(mongo: AsyncMongoClient[dict[str, Any]], unique: str) -> None:
    """Entries sealed before their patient's erasure, written after it was handled, remove
    themselves; the same patient's later study (a fresh key) and another patient's stay."""
    erased, kept = "ab" * 16, "cd" * 16
    erased_at = T0 + dt.timedelta(seconds=10)
    index = StudyIndex(mongo, f"index_{unique}")
    await index.ensure_indexes()
    before = _entry(dicom_samples.ct_image(seed=31, rows=16, columns=16), erased)
    await index.add(before)
    assert await index.remove_patient(erased, erased_at) == 3

    late_study = generate_uid()
    late = [
        _entry(ds, erased)
        for ds in _in_series(
            generate_uid(),
            *(dicom_samples.ct_image(study_uid=late_study, seed=s, rows=16, columns=16) for s in (32, 33)),
        )
    ]
    returning = _entry(dicom_samples.ct_image(seed=34, rows=16, columns=16), erased, erased_at + dt.timedelta(days=30))
    other = _entry(dicom_samples.ct_image(seed=35, rows=16, columns=16), kept)
    await index.add_many([*late, returning, other])

    assert await index.locate(late_study) == []
    assert [located.sop_uid for located in await index.locate(returning.study_uid)] == [returning.sop_uid]
    assert [located.sop_uid for located in await index.locate(other.study_uid)] == [other.sop_uid]
    for name in COLLECTIONS:
        assert await mongo[f"index_{unique}"][name].count_documents({"patient_ref": erased}) == 1  # returning


@pytest.fixture
async def crypto(pki: Pki, servers: Servers, tmp_path: Path, unique: str) -> AsyncIterator[Stub]:
    creds = vault_setup.provision(servers.vault_addr, servers.vault_token)
    topics = Topics(f"t{unique}.")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=1))
    cfg = with_tls(
        crypto_config(servers.kafka_bootstrap, servers.vault_addr, creds, tmp_path / "store", topics.prefix),
        pki,
        "crypto",
    )
    async with (
        running(lambda stop: run_crypto(cfg, stop), cfg.grpc_bind, pki.tls(TEST_CLIENT)),
        new_channel(cfg.grpc_bind, pki.tls(TEST_CLIENT)) as channel,
    ):
        yield crypto_pb2_grpc.CryptoServiceStub(channel)


async def _seal(stub: Stub, store_dir: Path, ds: FileDataset) -> tuple[str, bytes]:
    data = dicom_samples.to_bytes(ds)
    meta = crypto_pb2.SealMetadata(
        object_id=object_id_for(ds.SOPInstanceUID, hashlib.sha256(data).hexdigest()),
        sop_instance_uid=ds.SOPInstanceUID,
        study_instance_uid=ds.StudyInstanceUID,
        patient_id=str(ds.PatientID),
        issuer_of_patient_id="HOSP-A",
    )
    await Sealer(stub, FileStore(store_dir), 60).seal(data, meta)
    return meta.object_id, data


def _record(offset: int, value: bytes) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord("dicom.stored", 0, offset, 0, 0, None, value, None, 0, len(value), [])


def _stored(ds: FileDataset, object_id: str) -> bytes:
    event = events_pb2.StoredEvent(object_id=object_id, sop_instance_uid=ds.SOPInstanceUID)
    event.stored_at.FromDatetime(T0)
    return event.SerializeToString()


async def test_indexer_batch_reads_back_only_what_is_not_indexed(
    crypto: Stub, mongo: AsyncMongoClient[dict[str, Any]], unique: str, tmp_path: Path
) -> None:
    study = generate_uid()
    by_stow, by_event = (dicom_samples.ct_image(study_uid=study, seed=s, rows=16, columns=16) for s in (41, 42))
    index = StudyIndex(mongo, f"index_{unique}")
    await index.ensure_indexes()
    sealed = [await _seal(crypto, tmp_path / "store", ds) for ds in (by_stow, by_event)]
    description = await crypto.Describe(crypto_pb2.DescribeRequest(object_id=sealed[0][0]))
    await index.add(_entry(by_stow, description.erasure_key_ref, object_id=sealed[0][0]))  # as STOW-RS does
    instances = mongo[f"index_{unique}"]["instances"]
    stow_write = await instances.find_one({"_id": str(by_stow.SOPInstanceUID)})
    assert stow_write is not None

    indexer = Indexer(crypto, index, 60)
    records = [_record(0, _stored(by_stow, sealed[0][0])), _record(1, _stored(by_event, sealed[1][0]))]
    await indexer.handle_batch(records)
    # Only the instance STOW-RS had not indexed was read back; the other was left as written.
    assert await instances.find_one({"_id": str(by_stow.SOPInstanceUID)}) == stow_write
    [read_back] = await index.locate(study, sop_uid=str(by_event.SOPInstanceUID))
    assert (read_back.object_id, read_back.size) == (sealed[1][0], len(sealed[1][1]))

    # A bad record fails the batch, so the consume loop redoes it record by record (dead-lettering it).
    with pytest.raises(PermanentError, match="bad_envelope"):
        await indexer.handle_batch([*records, _record(2, b"\xff not an event")])


async def test_indexer_dead_letters_an_object_that_fails_authentication(
    crypto: Stub, mongo: AsyncMongoClient[dict[str, Any]], unique: str, tmp_path: Path
) -> None:
    # An altered sealed object never opens: retrying its event would block the partition forever.
    ds = dicom_samples.ct_image(seed=51, rows=16, columns=16)
    object_id, _ = await _seal(crypto, tmp_path / "store", ds)
    [sealed_file] = (tmp_path / "store").rglob(f"{object_id}*")
    body = bytearray(sealed_file.read_bytes())
    body[-40] ^= 0x01  # inside the last chunk's ciphertext
    sealed_file.write_bytes(bytes(body))
    index = StudyIndex(mongo, f"index_{unique}")
    await index.ensure_indexes()
    with pytest.raises(PermanentError, match="unreadable_object"):
        await Indexer(crypto, index, 60).handle(_record(0, _stored(ds, object_id)))
    assert await index.locate(str(ds.StudyInstanceUID)) == []


async def test_indexer_leaves_a_fresh_event_to_the_stow_request_that_caused_it(
    crypto: Stub, mongo: AsyncMongoClient[dict[str, Any]], unique: str, tmp_path: Path
) -> None:
    # The dicom.stored event of a STOW-RS instance reaches the indexer about when the request
    # indexes it; during the grace period the indexer reads nothing back through crypto.
    ds = dicom_samples.ct_image(seed=61, rows=16, columns=16)
    object_id, _ = await _seal(crypto, tmp_path / "store", ds)
    index = StudyIndex(mongo, f"index_{unique}")
    await index.ensure_indexes()
    value = _stored(ds, object_id)
    fresh = ConsumerRecord("dicom.stored", 0, 0, int(time.time() * 1000), 0, None, value, None, 0, len(value), [])
    handling = asyncio.create_task(Indexer(crypto, index, 60, grace_s=30).handle(fresh))
    # Ample for a read back (a few ms here); a slow machine could only make this pass wrongly.
    await asyncio.sleep(0.5)
    assert not handling.done()
    assert await index.locate(str(ds.StudyInstanceUID)) == []
    handling.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await handling
    # Once the grace period is over (none here), an event nobody indexed is read back.
    await Indexer(crypto, index, 60, grace_s=0).handle(fresh)
    [located] = await index.locate(str(ds.StudyInstanceUID))
    assert located.object_id == object_id


async def test_a_page_of_many_studies_counts_each_of_its_own(
    mongo: AsyncMongoClient[dict[str, Any]], unique: str
) -> None:
    """The related counts of a page come from one grouped count per collection: each study and
    series still gets its own numbers."""
    index = StudyIndex(mongo, f"counts_{unique}")
    await index.ensure_indexes()
    shape: dict[str, tuple[int, ...]] = {}  # study -> instances of each of its series
    entries = []
    for s, per_series in enumerate([(1,), (2, 3), (1, 1, 4), (5,)]):
        study = str(generate_uid())
        shape[study] = per_series
        for k, n in enumerate(per_series):
            series = generate_uid()
            for i in range(n):
                ds = dicom_samples.ct_image(study_uid=study, seed=100 * s + 10 * k + i, rows=16, columns=16)
                ds.SeriesInstanceUID = series
                ds.PatientID = f"PAT-{unique}"
                entries.append(_entry(ds))
    await index.add_many(entries)

    studies = await index.search("study", {"PatientID": f"PAT-{unique}"})
    got = {hit.study_uid: (hit.attrs["00201206"]["Value"][0], hit.attrs["00201208"]["Value"][0]) for hit in studies}
    assert got == {study: (len(per), sum(per)) for study, per in shape.items()}

    # Series level under one study: instances per series.
    three = next(uid for uid, per in shape.items() if len(per) == 3)
    series_hits = await index.search("series", {}, study_uid=three)
    assert sorted(hit.attrs["00201209"]["Value"][0] for hit in series_hits) == [1, 1, 4]
