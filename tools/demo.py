"""The demo (`make run`): the whole pipeline on real servers, in a few minutes.

Starts Kafka, Vault (OpenBao), a MongoDB-wire server and an S3 server (SeaweedFS) unless
KAFKA_BOOTSTRAP / VAULT_ADDR+VAULT_TOKEN / MONGODB_URI / S3_ENDPOINT_URL name existing ones;
provisions Vault; starts the services as processes; publishes sample studies; shows them sealed
in the object store (S3, as deployed), retrieved by an authorised user and refused to others;
stores, finds and reads a study over DICOMweb; verifies the audit chain; stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import pydicom
import requests
from aiokafka import AIOKafkaConsumer
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicomsafe.common.grpc_runtime import new_channel
from dicomsafe.common.kafka import Topics, dlq_topic, ensure_topics, headers_for, new_producer, topic_specs
from dicomsafe.common.tls import TlsConfig
from dicomsafe.storage.object_store import S3Settings, StoreSettings, open_store
from dicomsafe.v1 import audit_pb2, audit_pb2_grpc, events_pb2, retrieval_pb2, retrieval_pb2_grpc
from tools import dicom_samples, infra
from tools.oidc_issuer import LocalIssuer
from tools.stack import Stack, StackSettings

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Servers:
    kafka: str
    vault_addr: str
    vault_token: str
    mongo: str
    # The S3 API the sealed objects go to (as in Kubernetes).
    s3: S3Settings
    started_locally: tuple[str, ...]


def say(text: str = "") -> None:
    print(text, flush=True)


def resolve_servers() -> Servers:
    kafka, mongo = os.environ.get("KAFKA_BOOTSTRAP", ""), os.environ.get("MONGODB_URI", "")
    vault_addr, vault_token = os.environ.get("VAULT_ADDR", ""), os.environ.get("VAULT_TOKEN", "")
    s3_url = os.environ.get("S3_ENDPOINT_URL", "")
    s3 = S3Settings(
        endpoint_url=s3_url,
        region=os.environ.get("S3_REGION", "us-east-1"),
        access_key_id=os.environ.get("S3_ACCESS_KEY_ID"),
        secret_access_key=os.environ.get("S3_SECRET_ACCESS_KEY"),
    )
    have_servers = (("kafka", kafka), ("vault", vault_addr and vault_token), ("mongo", mongo), ("s3", s3_url))
    need = [n for n, have in have_servers if not have]
    if need:
        say(f"• starting local servers: {', '.join(need)} (first run installs them; later runs reuse the cache)")
        t0 = time.monotonic()
        local = infra.up(need)
        say(f"  ready in {time.monotonic() - t0:.1f}s")
        kafka = kafka or local.kafka_bootstrap
        mongo = mongo or local.mongodb_uri
        if "vault" in need:
            vault_addr, vault_token = local.vault_addr, local.vault_token
        if "s3" in need:
            s3 = S3Settings(
                endpoint_url=local.s3_endpoint_url,
                region=infra.S3_REGION,
                access_key_id=local.s3_access_key_id,
                secret_access_key=local.s3_secret_access_key,
            )
    return Servers(kafka, vault_addr, vault_token, mongo, s3, tuple(need))


async def publish(bootstrap: str, topics: Topics, samples: list[tuple[str, bytes]], junk: bytes) -> dict[str, str]:
    producer = new_producer(bootstrap, "demo-publisher")
    await producer.start()
    ids: dict[str, str] = {}
    try:
        for name, data in samples:
            req = events_pb2.IngestRequest(request_id=str(uuid.uuid4()), source="demo-modality", inline_instance=data)
            req.sent_at.GetCurrentTime()
            study = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).StudyInstanceUID)
            await producer.send_and_wait(
                topics.ingest, req.SerializeToString(), key=study.encode(), headers=headers_for(req)
            )
            ids[req.request_id] = name
        bad = events_pb2.IngestRequest(request_id=str(uuid.uuid4()), source="demo-modality", inline_instance=junk)
        await producer.send_and_wait(topics.ingest, bad.SerializeToString(), key=b"junk", headers=headers_for(bad))
        ids[bad.request_id] = "not-a-dicom-file"
    finally:
        await producer.stop()
    return ids


async def collect(bootstrap: str, topic: str, want: int, timeout_s: float) -> list[bytes]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    values: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(values) < want and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            values.extend(r.value for records in batch.values() for r in records)
    finally:
        await consumer.stop()
    return values


async def retrieve(target: str, tls: TlsConfig, token: str, object_id: str) -> tuple[bytes | None, str]:
    async with new_channel(target, tls) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        parts: list[bytes] = []
        try:
            request = retrieval_pb2.RetrieveRequest(access_token=token, object_id=object_id, purpose="treatment")
            async for piece in stub.Retrieve(request, timeout=60):
                parts.append(piece.data)
        except grpc.aio.AioRpcError as exc:
            return None, f"{exc.code().name}: {exc.details()}"
        return b"".join(parts), "OK"


async def audit_trail(
    target: str, tls: TlsConfig, token: str, want: int, timeout_s: float
) -> tuple[audit_pb2.VerifyResponse, list[audit_pb2.AuditRecord]]:
    """As the auditor: reading the trail needs the auditor role, and is itself recorded."""
    async with new_channel(target, tls) as channel:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        deadline = time.monotonic() + timeout_s
        while True:
            verdict = await stub.Verify(audit_pb2.VerifyRequest(access_token=token), timeout=30)
            # Wait for the records, and for every chain's head to be signed (every few seconds).
            complete = verdict.records_checked >= want and verdict.checkpoints_checked >= verdict.chains_checked
            if complete or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        records = [r async for r in stub.Query(audit_pb2.QueryRequest(limit=200, access_token=token), timeout=30)]
    return verdict, records


async def story(stack: Stack, servers: Servers, topics: Topics, idp: LocalIssuer) -> bool:
    samples = dicom_samples.sample_study_set(seed=int(time.time()) % 10_000)
    junk = dicom_samples.malformed_samples()["not_dicom"]
    say(f"\n① publishing {len(samples)} DICOM instances (+1 malformed) to '{topics.ingest}'")
    for name, data in samples:
        say(f"   {name:<28} {len(data) / 1e6:7.2f} MB")
    await publish(servers.kafka, topics, samples, junk)

    stored_raw = await collect(servers.kafka, topics.stored, len(samples), timeout_s=120)
    stored = [events_pb2.StoredEvent.FromString(v) for v in stored_raw]
    dead = [events_pb2.DeadLetter.FromString(v) for v in await collect(servers.kafka, dlq_topic(topics.ingest), 1, 60)]
    say(f"\n② stored events on '{topics.stored}': {len(stored)}/{len(samples)}; dead letters: {len(dead)}")
    for letter in dead:
        say(f"   dead letter from {letter.source_topic}@{letter.source_offset}: {letter.reason_code} — {letter.reason}")

    by_sha = {hashlib.sha256(d).hexdigest(): (n, d) for n, d in samples}
    ok = len(stored) == len(samples) and len(dead) == 1
    store = open_store(StoreSettings(stack.settings.crypto_store_url, servers.s3))
    say(f"\n③ in the object store ({store.describe_location()}), sealed")
    say("   (AES-256-GCM, a fresh data key per object, wrapped by Vault Transit):")
    for event in stored:
        name, original = by_sha[event.plaintext_sha256]
        with store.open_read(event.object_id) as f:
            sealed = f.read()
        leaks = [
            label
            for label, needle in (
                # The file signature: "DICM" alone may occur in the base64 of the wrapped key.
                ("DICM", bytes(128) + b"DICM"),
                ("patient name", dicom_samples.SYNTHETIC_MARKER),
                ("pixel bytes", original[-4096:]),
            )
            if needle in sealed
        ]
        ok &= not leaks
        say(
            f"   {name:<28} {event.object_id[:16]}… {len(sealed):>9} B  key v{event.key_version}  "
            f"plaintext found: {', '.join(leaks) if leaks else 'none'}"
        )

    target = stack.settings.target("gateway")
    # The demo calls the gateway as a trusted viewer back-end would, with its own certificate.
    viewer = stack.settings.client_tls("viewer")
    first = stored[0]
    # Retrieval fails closed until the gateway's study index knows a study's sensitivity labels.
    await stack.wait_indexed({e.study_instance_uid for e in stored})
    say(f"\n④ retrieval of {by_sha[first.plaintext_sha256][0]} through the gateway (authz → crypto → audit):")
    say(f"   (users sign in at a local OpenID Connect issuer, {idp.url}; authz checks each token)")
    released, status = await retrieve(target, viewer, idp.token("dr.house"), first.object_id)
    same = released is not None and hashlib.sha256(released).hexdigest() == first.plaintext_sha256
    ok &= same
    say(f"   {'dr.house (radiologist)':<32} → {status}, {len(released or b'')} bytes, byte-identical: {same}")
    refused_cases = [
        ("res.rao (researcher)", idp.token("res.rao")),
        ("mallory (no role at all)", idp.token("mallory")),
        ("dr.house with an expired token", idp.token("dr.house", lifetime_s=-120)),
    ]
    for label, token in refused_cases:
        refused, status = await retrieve(target, viewer, token, first.object_id)
        ok &= refused is None
        say(f"   {label:<32} → {status}")

    ok &= dicomweb_tour(stack, idp)

    # Per instance: sealed + stored; the rejection; the allowed read: decision + open +
    # retrieval; each refused read: decision + retrieval. (The DICOMweb tour adds more.)
    want = 2 * len(samples) + 1 + 3 + 2 * len(refused_cases)
    verdict, records = await audit_trail(
        stack.settings.target("audit"), stack.settings.client_tls("ops"), idp.token("aud.ito"), want, timeout_s=60
    )
    say(
        f"\n⑤ audit trail in MongoDB: {verdict.records_checked} records in {verdict.chains_checked} hash chains, "
        f"{verdict.checkpoints_checked} signed checkpoints"
    )
    for record in sorted(records, key=lambda r: r.event.occurred_at.ToDatetime())[-12:]:
        e = record.event
        say(
            f"   {record.chain:<22} #{record.seq:<3} {audit_pb2.AuditAction.Name(e.action)[13:]:<20} "
            f"{audit_pb2.AuditOutcome.Name(e.outcome)[14:]:<8} {e.service:<8} {e.actor[:24]:<24} {e.reason[:40]}"
        )
    say(f"   verify: {'OK — every chain intact' if verdict.ok else 'BROKEN: ' + str(list(verdict.breaks))}")
    ok &= verdict.ok and verdict.records_checked >= want
    return ok


def dicomweb_tour(stack: Stack, idp: LocalIssuer) -> bool:
    """DICOMweb as a viewer speaks it, through a real client (dicomweb-client) over HTTPS."""

    def client(token: str | None) -> DICOMwebClient:
        session = requests.Session()
        session.trust_env = False  # REQUESTS_CA_BUNDLE would override the pinned CA
        session.verify = str(stack.settings.ca_file)
        if token:
            session.headers["Authorization"] = f"Bearer {token}"
        return DICOMwebClient(stack.settings.dicomweb_url, session=session)

    study = generate_uid()
    patient = dicom_samples.synthetic_patient("dicomweb-demo")
    cine = dicom_samples.us_multiframe(study_uid=study, patient=patient, frames=6, rows=120, columns=160)
    slices = [dicom_samples.ct_image(study_uid=study, patient=patient, seed=i, rows=128, columns=128) for i in (1, 2)]
    sent = [dcmread(io.BytesIO(dicom_samples.to_bytes(ds))) for ds in (*slices, cine)]
    say(f"\n④b DICOMweb at {stack.settings.dicomweb_url} (TLS 1.3 only; every call: token → authz → crypto → audit)")
    ok = True
    reply = client(idp.token("tech.jane")).store_instances(sent)
    stored = len(reply.get("ReferencedSOPSequence", []))
    ok &= stored == len(sent)
    say(f"   STOW-RS  tech.jane (technologist) stores {len(sent)} instances of a new study → {stored} stored")
    found = client(idp.token("dr.house")).search_for_studies(search_filters={"PatientID": str(patient.patient_id)})
    ok &= [s["0020000D"]["Value"][0] for s in found] == [study]
    count = found[0]["00201208"]["Value"][0] if found else 0
    say(f"   QIDO-RS  dr.house searches by patient ID → {len(found)} study, {count} instances")
    size = int(cine.Rows) * int(cine.Columns) * 3
    frame = client(idp.token("dr.house")).retrieve_instance_frames(
        study, str(cine.SeriesInstanceUID), str(cine.SOPInstanceUID), [3]
    )[0]
    same = frame == cine.PixelData[2 * size : 3 * size]
    ok &= same
    say(f"   WADO-RS  dr.house reads frame 3 of the cine only → {len(frame)} bytes, byte-identical: {same}")
    researcher = client(idp.token("res.rao"))
    try:
        researcher.search_for_studies(search_filters={"PatientID": str(patient.patient_id)})
        ok = False
        say("   QIDO-RS  res.rao (researcher) matched on a patient ID (WRONG)")
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else 0
        ok &= code == 400
        say(f"   QIDO-RS  res.rao (researcher) searches by patient ID → {code} (not matchable when de-identified)")
    # What a researcher finds carries pseudonymous UIDs only, and those are what they retrieve.
    listed = researcher.search_for_instances(limit=1)
    uids = tuple(listed[0][tag]["Value"][0] for tag in ("0020000D", "0020000E", "00080018")) if listed else ()
    research = researcher.retrieve_instance(*uids) if len(uids) == 3 else None
    anonymous = (
        research is not None
        and research.PatientIdentityRemoved == "YES"
        and str(research.PatientName) != str(slices[0].PatientName)
        and (research.StudyInstanceUID, research.SeriesInstanceUID, research.SOPInstanceUID) == uids
        and study not in uids
    )
    ok &= anonymous
    say(
        "   QIDO+WADO res.rao (researcher) → de-identified (PS3.15 Annex E), pseudonymous UIDs, "
        f"name and IDs removed: {anonymous}"
    )
    try:
        client(None).retrieve_study(study)
        ok = False
        say("   WADO-RS  without a token → served (WRONG)")
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else 0
        ok &= code == 401
        say(f"   WADO-RS  without a token → {code}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep-running", action="store_true", help="leave servers and services running afterwards")
    args = parser.parse_args()
    work = REPO / "var" / "demo" / time.strftime("%Y%m%d-%H%M%S")
    servers = resolve_servers()
    topics = Topics(prefix=f"demo{int(time.time())}.")
    asyncio.run(ensure_topics(servers.kafka, topic_specs(topics)))
    idp = LocalIssuer().start()
    settings = StackSettings(
        kafka_bootstrap=servers.kafka,
        vault_addr=servers.vault_addr,
        mongodb_uri=servers.mongo,
        vault_admin_token=servers.vault_token,
        work_dir=work,
        topic_prefix=topics.prefix,
        audit_db=f"dicomsafe_audit_{topics.prefix.strip('.')}",
        oidc_issuer=idp.url,
        oidc_jwks_url=idp.jwks_url,
        crypto_store_url=f"s3://dicomsafe-demo/{topics.prefix.strip('.')}",
        s3=servers.s3,
    )
    stack = Stack(settings)
    ok = False
    try:
        say("• provisioning each service's own least-privilege identity: crypto (Vault AppRole: data keys),")
        say("  audit (Vault AppRole: checkpoint signing; MongoDB user: insert + find only)")
        say("• starting services: crypto, authz, audit, gateway, ingest — gRPC between them is mutual TLS 1.3,")
        say(f"  each with its own certificate (identity spiffe://dicomsafe/<service>) from a CA made now in {work}/pki")
        stack.start()
        ok = asyncio.run(story(stack, servers, topics, idp))
    finally:
        if args.keep_running:
            pids = " ".join(str(p.pid) for p in stack.processes.values())
            say(f"\nservices keep running (logs in {work}/logs); stop with: kill {pids}")
            say("(the demo's identity provider ends with this process: new tokens cannot be issued)")
        else:
            stack.stop()
            idp.stop()
            if servers.started_locally:
                infra.down(list(servers.started_locally))
            say("\n• stopped services" + (" and local servers" if servers.started_locally else ""))
    say("\nDEMO " + ("PASSED" if ok else "FAILED") + f" — logs in {work}/logs")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
