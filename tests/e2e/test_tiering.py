"""Hot/archive tiering on a running site (two S3 prefixes as the tiers): the job moves what the
policy says is due, sealed bytes as they are; retrieval through the gateway stays byte for
byte (crypto opens from the archive, and reports that tier's latency); each move is audited;
a re-run moves nothing; a move interrupted after its copy is finished by the next run."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import secrets
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pydicom
import pytest
from pymongo import AsyncMongoClient
from pymongo.errors import OperationFailure

from dicomsafe.common.audit_emitter import AuditEmitter
from dicomsafe.common.grpc_runtime import new_channel
from dicomsafe.common.kafka import Topics, new_producer
from dicomsafe.common.mongo_users import user_uri
from dicomsafe.storage.object_store import S3Settings, StoreSettings, copy_verified, open_store, sha256_of
from dicomsafe.storage.store_s3 import new_client
from dicomsafe.v1 import crypto_pb2, crypto_pb2_grpc
from services.audit.store import COLLECTION
from tests.own_site import instances, publish, site_settings, wado_uri
from tests.servers import Servers
from tests.service_runner import TEST_BUCKET, s3_settings
from tools import dicom_samples, tiering, vault_setup
from tools.erase_patient import ErasureRequest, erase_patient
from tools.oidc_issuer import LocalIssuer
from tools.stack import Stack

ARCHIVE_RETENTION_DAYS = 7
_T = TypeVar("_T")


@pytest.fixture
def site(servers: Servers, idp: LocalIssuer, tmp_path: Path) -> Iterator[Stack]:
    unique = uuid.uuid4().hex[:8]
    settings = site_settings(
        servers,
        idp,
        tmp_path,
        "tier",
        partitions=2,
        crypto_store_url=f"s3://{TEST_BUCKET}/tier-hot-{unique}",
        # Its own bucket: the archive's objects are put under Object Lock.
        crypto_archive_url=f"s3://dicomsafe-archive-{unique}/objects",
        crypto_archive_retention_days=ARCHIVE_RETENTION_DAYS,
        s3=s3_settings(servers.s3),
    )
    stack = Stack(settings)
    try:
        stack.start()
        yield stack
    finally:
        codes = stack.stop()
    assert all(code == 0 for code in codes.values()), f"unclean service exit: {codes}"


def _tier(stack: Stack, which: str) -> Any:
    s = stack.settings
    assert s.s3 is not None
    if which == "hot":
        return open_store(StoreSettings(s.crypto_store_url, s.s3))
    return open_store(StoreSettings(s.crypto_archive_url, s.s3, retention_days=ARCHIVE_RETENTION_DAYS))


async def _ingest(stack: Stack, files: dict[str, bytes]) -> dict[str, str]:
    """Publish, then wait for every instance in the index; SOP UID -> object id."""
    await publish(stack.settings, files.values())
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(stack.settings.mongodb_uri)
    deadline = time.monotonic() + 120
    try:
        while True:
            found = {
                str(d["_id"]): str(d["object_id"])
                async for d in client[stack.settings.index_db]["instances"].find({"_id": {"$in": list(files)}})
            }
            if len(found) == len(files):
                return found
            assert time.monotonic() < deadline, "instances never indexed"
            await asyncio.sleep(0.5)
    finally:
        await client.close()


JOB_PASSWORD = secrets.token_urlsafe(18)


async def _job_uri(stack: Stack) -> str:
    """The job's own least-privilege user (``tiering provision``), as the CronJob runs with."""
    admin = stack.settings.mongodb_uri
    if not urllib.parse.urlsplit(admin).username:
        return admin  # a server without access control: no identities to provision
    user, password = await tiering.provision(admin, stack.settings.index_db, JOB_PASSWORD)
    return user_uri(admin, stack.settings.index_db, user, password)


async def _with_job(stack: Stack, job: Callable[[Any, Any, Any, AuditEmitter], Awaitable[_T]]) -> _T:
    """``job(hot, archive, index, audit)`` as the tiering job's process would run it."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(await _job_uri(stack))
    producer = new_producer(stack.settings.kafka_bootstrap, "tiering-test")
    await producer.start()
    try:
        audit = AuditEmitter(producer, "tiering", Topics(stack.settings.topic_prefix).audit)
        return await job(_tier(stack, "hot"), _tier(stack, "archive"), client[stack.settings.index_db], audit)
    finally:
        await producer.stop()
        await client.close()


async def _run_job(stack: Stack, policy: tiering.Policy) -> tiering.Report:
    return await _with_job(stack, lambda hot, archive, index, audit: tiering.run(policy, hot, archive, index, audit))


async def _index(stack: Stack, collection: str, query: dict[str, Any]) -> list[dict[str, Any]]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(stack.settings.mongodb_uri)
    try:
        return [d async for d in client[stack.settings.index_db][collection].find(query)]
    finally:
        await client.close()


async def _tiering_events(stack: Stack) -> list[dict[str, Any]]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(stack.settings.mongodb_uri)
    try:
        events = client[stack.settings.audit_db][COLLECTION]
        return [d["event"] async for d in events.find({"event.action": "AUDIT_ACTION_OBJECT_TIERED"})]
    finally:
        await client.close()


ISSUER = "TIERING-TEST"
ARCHIVED_PATIENT = f"ARCH-{uuid.uuid4().hex[:8]}"


def _wado(stack: Stack, token: str, data: bytes) -> bytes:
    got = wado_uri(stack.settings, token, data)
    assert got.status_code == 200, got.text
    return got.content


def test_old_instances_move_to_the_archive_and_stay_retrievable(site: Stack, idp: LocalIssuer) -> None:
    ct = instances(dicom_samples.ct_image, 6, 10, PatientID=ARCHIVED_PATIENT, IssuerOfPatientID=ISSUER)
    mr = instances(dicom_samples.mr_image, 3, 50)
    objects = asyncio.run(_ingest(site, ct | mr))
    hot, archive = _tier(site, "hot"), _tier(site, "archive")
    # CT due at once; MR stays hot.
    policy = tiering.Policy(tiering.Rule("default", after_days=0), {"MR": tiering.Rule("modality.MR")})

    report = asyncio.run(_run_job(site, policy))
    assert (report.due, report.moved, report.by_rule) == (6, 6, {"default": 6})
    for sop, object_id in objects.items():
        assert hot.exists(object_id) == (sop in mr) and archive.exists(object_id) == (sop in ct)
    # Archived under Object Lock: retained, whoever asks.
    client = new_client(site.settings.s3 or S3Settings())
    head = client.head_object(Bucket=archive.bucket, Key=archive.key_of(objects[next(iter(ct))]))
    assert head["ObjectLockMode"] == "COMPLIANCE"

    # Transparent retrieval, byte for byte, from either tier; the archive's opens are measured.
    house = idp.token("dr.house")
    for data in (ct | mr).values():
        assert _wado(site, house, data) == data
    with urllib.request.urlopen(site.settings.metrics_url("crypto"), timeout=10) as response:
        metrics = response.read().decode()
    archive_opens = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith('dicomsafe_crypto_store_open_seconds_count{tier="archive"}')
    )
    assert archive_opens >= len(ct)

    # The job's identity may mark tiers, never remove or add an index entry.
    async def job_may_not_delete() -> None:
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(await _job_uri(site))
        try:
            with pytest.raises(OperationFailure) as refused:
                await client[site.settings.index_db]["instances"].delete_one({"_id": next(iter(ct))})
            assert refused.value.code == 13
        finally:
            await client.close()

    if urllib.parse.urlsplit(site.settings.mongodb_uri).username:
        asyncio.run(job_may_not_delete())

    # Idempotent: nothing more is due.
    again = asyncio.run(_run_job(site, policy))
    assert (again.due, again.moved) == (0, 0)

    # Resumable: a run that died after copying one object (not yet indexed, hot copy kept) is
    # finished by the next, without copying it again.
    late = instances(dicom_samples.ct_image, 1, 90)
    ((late_sop, late_id),) = asyncio.run(_ingest(site, late)).items()
    copy_verified(hot, archive, late_id, sha256_of(hot, late_id))
    resumed = asyncio.run(_run_job(site, policy))
    assert (resumed.moved, resumed.bytes_moved) == (1, 0)
    assert not hot.exists(late_id) and archive.exists(late_id)
    assert _wado(site, house, late[late_sop]) == late[late_sop]

    # Every move is on the trail.
    want = {objects[sop] for sop in ct} | {late_id}
    deadline = time.monotonic() + 60
    while (got := {str(e["object_id"]) for e in asyncio.run(_tiering_events(site))}) != want:
        assert time.monotonic() < deadline, f"tiering audited for {len(got)} of {len(want)} objects"
        time.sleep(0.5)

    # Crypto-shredding reaches the archive: the CT patient erased, their retained objects stay
    # in the locked bucket but no longer open.
    officer = vault_setup.erasure_officer_token(site.settings.vault_addr, site.settings.vault_admin_token)
    request = ErasureRequest(idp.token("dpo.lee"), ARCHIVED_PATIENT, ISSUER, "GDPR art. 17 request (tiering test)")
    ops = site.settings.client_tls("ops")
    asyncio.run(
        erase_patient(
            request,
            site.settings.vault_addr,
            officer,
            site.settings.target("authz"),
            ops,
            site.settings.kafka_bootstrap,
            Topics(site.settings.topic_prefix),
        )
    )

    async def open_archived(object_id: str) -> grpc.StatusCode:
        async with new_channel(site.settings.target("crypto"), site.settings.client_tls("gateway")) as channel:
            stub = crypto_pb2_grpc.CryptoServiceStub(channel)
            try:
                async for _ in stub.Open(crypto_pb2.OpenRequest(object_id=object_id, on_behalf_of="dr.house")):
                    pass
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

    erased = objects[next(iter(ct))]
    assert archive.exists(erased) and not hot.exists(erased)
    assert asyncio.run(open_archived(erased)) == grpc.StatusCode.FAILED_PRECONDITION
    assert asyncio.run(open_archived(objects[next(iter(mr))])) == grpc.StatusCode.OK  # another patient


def test_studies_not_read_move_and_a_recall_brings_them_back(site: Stack, idp: LocalIssuer) -> None:
    read = instances(dicom_samples.ct_image, 3, 110)
    unread = instances(dicom_samples.ct_image, 4, 120)
    objects = asyncio.run(_ingest(site, read | unread))
    unread_study = str(pydicom.dcmread(io.BytesIO(next(iter(unread.values())))).StudyInstanceUID)
    read_study = str(pydicom.dcmread(io.BytesIO(next(iter(read.values())))).StudyInstanceUID)
    assert unread_study != read_study

    async def stored_ten_days_ago() -> None:
        # As if ingested ten days ago: the only thing this test changes behind the site's back.
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(site.settings.mongodb_uri)
        try:
            earlier = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
            instances_ = client[site.settings.index_db]["instances"]
            await instances_.update_many({"_id": {"$in": list(objects)}}, {"$set": {"stored_at": earlier}})
        finally:
            await client.close()

    asyncio.run(stored_ten_days_ago())
    # One study is read through the gateway: the gateway records when.
    house = idp.token("dr.house")
    assert _wado(site, house, next(iter(read.values()))) == next(iter(read.values()))
    deadline = time.monotonic() + 30
    while not asyncio.run(_index(site, "studies", {"_id": read_study, "accessed_at": {"$exists": True}})):
        assert time.monotonic() < deadline, "the gateway never recorded the study's read"
        time.sleep(0.2)
    assert not asyncio.run(_index(site, "studies", {"_id": unread_study, "accessed_at": {"$exists": True}}))

    # Not read for a day: only the unread study is due (and none by age).
    policy = tiering.Policy(tiering.Rule("default", after_days=365, idle_days=1))
    report = asyncio.run(_run_job(site, policy))
    assert (report.due, report.moved) == (len(unread), len(unread))
    hot, archive = _tier(site, "hot"), _tier(site, "archive")
    for sop, object_id in objects.items():
        assert hot.exists(object_id) == (sop in read) and archive.exists(object_id) == (sop in unread)

    # Recalled ahead of a comparison: back in the hot tier, held there against the policy,
    # still byte for byte, and the archive's locked copy kept.
    recalled = asyncio.run(
        _with_job(
            site,
            lambda hot_, archive_, index, audit: tiering.recall(
                hot_, archive_, index, audit, unread_study, "priors for a scheduled comparison", keep_days=7
            ),
        )
    )
    assert (recalled.instances, recalled.copied) == (len(unread), len(unread))
    for sop in unread:
        assert hot.exists(objects[sop]) and archive.exists(objects[sop])
    tiers = {d["_id"]: d.get("tier") for d in asyncio.run(_index(site, "instances", {"_id": {"$in": list(unread)}}))}
    assert tiers == dict.fromkeys(unread, "hot")
    again = asyncio.run(_run_job(site, policy))
    assert (again.due, again.moved) == (0, 0)
    for data in unread.values():
        assert _wado(site, house, data) == data
    # A recall of what is hot already changes nothing.
    repeated = asyncio.run(
        _with_job(site, lambda h, a, i, audit: tiering.recall(h, a, i, audit, unread_study, "again"))
    )
    assert (repeated.instances, repeated.copied) == (0, 0)
    # A recall without a stated reason is refused.
    with pytest.raises(tiering.PolicyError):
        asyncio.run(_with_job(site, lambda h, a, i, audit: tiering.recall(h, a, i, audit, unread_study, " ")))

    # Both directions are on the trail, each saying why.
    want = {(objects[sop], "hot", "archive", "idle") for sop in unread} | {
        (objects[sop], "archive", "hot", "priors for a scheduled comparison") for sop in unread
    }
    deadline = time.monotonic() + 60
    while True:
        got = {
            (str(e["object_id"]), e["details"]["from"], e["details"]["to"], e["details"]["why"])
            for e in asyncio.run(_tiering_events(site))
        }
        if got == want:
            break
        assert time.monotonic() < deadline, f"tiering trail: {sorted(got ^ want)[:4]}"
        time.sleep(0.5)
