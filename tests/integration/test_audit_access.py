"""Reading the audit trail: only roles authz allows, with real tokens; every attempt is itself audited."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
from aiokafka import AIOKafkaConsumer

from dicomsafe.common.grpc_runtime import new_channel
from dicomsafe.common.kafka import Topics, ensure_topics, new_producer, topic_specs
from dicomsafe.v1 import audit_pb2, audit_pb2_grpc
from services.audit.app import run as run_audit
from services.audit.config import AuditConfig
from services.authz.app import run as run_authz
from tests.servers import Servers
from tests.service_runner import TEST_CLIENT, audit_config, authz_config, running, with_tls
from tools.oidc_issuer import LocalIssuer
from tools.pki import Pki
from tools.ports import free_port

REPO = Path(__file__).resolve().parents[2]
A, Out = audit_pb2.AuditAction, audit_pb2.AuditOutcome
STUDY = "1.2.840.99.1"


async def _query(stub: audit_pb2_grpc.AuditServiceAsyncStub, **fields: str) -> list[audit_pb2.AuditRecord]:
    return [r async for r in stub.Query(audit_pb2.QueryRequest(limit=1000, **fields), timeout=30)]  # type: ignore[arg-type]


async def _refusal(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        if isinstance(call, grpc.aio.UnaryStreamCall):
            async for _ in call:
                pass
        else:
            await call  # type: ignore[misc]
    return refused.value.code()


async def _audit_service(
    pki: Pki, servers: Servers, unique: str, database: str, authz_target: str, **settings: float
) -> tuple[Topics, AuditConfig]:
    """Topics of the test's own, the audit database provisioned with the writer's user, and the
    configuration of an audit service (mutual TLS) that asks ``authz_target`` for decisions."""
    topics = Topics(f"t{unique}.")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=1))
    cfg = with_tls(
        await audit_config(
            servers.kafka_bootstrap,
            topics.prefix,
            servers.mongodb_uri,
            database,
            authz_target=authz_target,
            **settings,
        ),
        pki,
        "audit",
    )
    return topics, cfg


async def test_only_auditors_read_and_every_attempt_is_recorded(
    pki: Pki, servers: Servers, unique: str, idp: LocalIssuer
) -> None:
    authz = with_tls(authz_config(servers.kafka_bootstrap, f"t{unique}.", idp), pki, "authz")
    topics, cfg = await _audit_service(pki, servers, unique, f"audit_acc_{unique}", authz.grpc_bind)
    producer = new_producer(servers.kafka_bootstrap, "test")
    await producer.start()
    try:
        seeded = audit_pb2.AuditEvent(
            event_id=str(uuid.uuid4()),
            service="test",
            action=A.AUDIT_ACTION_INSTANCE_RETRIEVED,
            outcome=Out.AUDIT_OUTCOME_SUCCESS,
            actor="dr.house",
            study_instance_uid=STUDY,
        )
        await producer.send_and_wait(topics.audit, seeded.SerializeToString(), key=b"dr.house")
    finally:
        await producer.stop()

    auditor, physician, officer = idp.token("aud.ito"), idp.token("dr.house"), idp.token("dpo.lee")
    async with (
        running(lambda stop: run_authz(authz, stop), authz.grpc_bind, pki.tls(TEST_CLIENT)),
        running(lambda stop: run_audit(cfg, stop), cfg.grpc_bind, pki.tls(TEST_CLIENT)),
        new_channel(cfg.grpc_bind, pki.tls(TEST_CLIENT)) as ch,
    ):
        stub = audit_pb2_grpc.AuditServiceStub(ch)
        deadline = time.monotonic() + 60
        # Reads of this study are recorded with it too, so only the seeded event's own service counts.
        while not (
            found := [
                r.event
                for r in await _query(stub, access_token=auditor, study_instance_uid=STUDY)
                if r.event.service == "test"
            ]
        ):
            assert time.monotonic() < deadline, "seeded event never became queryable"
            await asyncio.sleep(0.3)
        assert found == [seeded]
        # The privacy officer may read (audit.read) but not verify; a physician may do neither.
        assert await _query(stub, access_token=officer, study_instance_uid=STUDY)
        verdict = await stub.Verify(audit_pb2.VerifyRequest(access_token=auditor), timeout=30)
        assert verdict.ok and verdict.records_checked >= 1
        # Without checkpoints there is nothing published to check against: said, not skipped.
        published = audit_pb2.VerifyRequest(access_token=auditor, published_checkpoints=True)
        assert await _refusal(stub.Verify(published, timeout=30)) == grpc.StatusCode.FAILED_PRECONDITION
        q = audit_pb2.QueryRequest(access_token=physician, study_instance_uid=STUDY)
        assert await _refusal(stub.Query(q)) == grpc.StatusCode.PERMISSION_DENIED
        v = audit_pb2.VerifyRequest(access_token=officer)
        assert await _refusal(stub.Verify(v)) == grpc.StatusCode.PERMISSION_DENIED
        assert await _refusal(stub.Query(audit_pb2.QueryRequest(study_instance_uid=STUDY))) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        # A token naming someone else than the claimed subject id is refused by authz.
        forged = audit_pb2.QueryRequest(access_token=physician, subject_id="aud.ito")
        assert await _refusal(stub.Query(forged)) == grpc.StatusCode.PERMISSION_DENIED

        # The CLI goes through the same door; the token comes from the environment, never argv.
        cli_ok = await asyncio.to_thread(_cli_query, cfg.grpc_bind, auditor, pki)
        cli_refused = await asyncio.to_thread(_cli_query, cfg.grpc_bind, physician, pki)
        assert cli_ok.returncode == 0, cli_ok.stderr
        assert seeded.event_id in cli_ok.stdout
        assert cli_refused.returncode == 3 and "PERMISSION_DENIED" in cli_refused.stderr
        assert cli_refused.stdout == ""

        # Every attempt above is in the trail, allowed or not (the polls add allowed reads).
        want = {
            ("aud.ito", "query", Out.AUDIT_OUTCOME_SUCCESS),
            ("dpo.lee", "query", Out.AUDIT_OUTCOME_SUCCESS),
            ("aud.ito", "verify", Out.AUDIT_OUTCOME_SUCCESS),
            ("dr.house", "query", Out.AUDIT_OUTCOME_DENIED),
            ("dpo.lee", "verify", Out.AUDIT_OUTCOME_DENIED),
            ("unauthenticated", "query", Out.AUDIT_OUTCOME_DENIED),
            ("aud.ito", "query", Out.AUDIT_OUTCOME_DENIED),
        }
        deadline = time.monotonic() + 60
        while True:
            records = await _query(stub, access_token=auditor, study_instance_uid="")
            attempts = [r.event for r in records if r.event.action == A.AUDIT_ACTION_AUDIT_QUERIED]
            seen = {(e.actor, e.details["operation"], e.outcome) for e in attempts}
            if want <= seen or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    assert want <= seen
    denied = [e for e in attempts if e.actor == "dr.house" and e.details["operation"] == "query"]
    # Recorded with what was asked and the decision behind the refusal.
    assert all(e.service == "audit" and e.details["decision_id"] and e.details["policy_version"] for e in denied)
    assert STUDY in {e.study_instance_uid for e in denied}
    assert {e.reason for e in denied} >= {"no role of the subject grants audit.read"}
    forged_attempts = [e for e in attempts if e.actor == "aud.ito" and e.outcome == Out.AUDIT_OUTCOME_DENIED]
    assert {e.reason for e in forged_attempts} == {"subject does not match the token"}


def _cli_query(target: str, token: str, pki: Pki) -> subprocess.CompletedProcess[str]:
    # The CLI reaches the service with an operator's certificate, the user's token inside.
    env = {**os.environ, **pki.env("ops"), "AUDIT_ACCESS_TOKEN": token}
    return subprocess.run(
        [sys.executable, "-m", "services.audit", "query", "--target", target, "--study", STUDY],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_no_decision_no_answer(pki: Pki, servers: Servers, unique: str) -> None:
    """authz unreachable: the read is refused (fail closed) and the failed attempt still recorded."""
    nowhere = f"127.0.0.1:{free_port()}"  # nothing listens there
    topics, cfg = await _audit_service(pki, servers, unique, f"audit_acc_{unique}", nowhere, authz_deadline_s=2.0)
    async with (
        running(lambda stop: run_audit(cfg, stop), cfg.grpc_bind, pki.tls(TEST_CLIENT)),
        new_channel(cfg.grpc_bind, pki.tls(TEST_CLIENT)) as ch,
    ):
        stub = audit_pb2_grpc.AuditServiceStub(ch)
        code = await _refusal(stub.Verify(audit_pb2.VerifyRequest(subject_id="aud.ito"), timeout=30))
    assert code == grpc.StatusCode.UNAVAILABLE

    consumer = AIOKafkaConsumer(topics.audit, bootstrap_servers=servers.kafka_bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    events: list[audit_pb2.AuditEvent] = []
    try:
        deadline = time.monotonic() + 30
        while not events and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=1000)
            events += [audit_pb2.AuditEvent.FromString(r.value or b"") for rs in batch.values() for r in rs]
        batch = await consumer.getmany(timeout_ms=1000)  # anything further would be an extra event
        events += [audit_pb2.AuditEvent.FromString(r.value or b"") for rs in batch.values() for r in rs]
    finally:
        await consumer.stop()
    assert [(e.actor, e.action, e.outcome, e.details["operation"]) for e in events] == [
        ("aud.ito", A.AUDIT_ACTION_AUDIT_QUERIED, Out.AUDIT_OUTCOME_FAILURE, "verify")
    ]
    assert events[0].reason.startswith("authz unavailable")


async def test_paging_through_the_service_with_action_and_outcome_filters(
    pki: Pki, servers: Servers, unique: str, idp: LocalIssuer
) -> None:
    """QueryPage over gRPC (and the CLI's --all-pages): walking every page of a filtered result
    yields exactly what one Query returns — no record twice, none missed — while the service's
    own access records for the same study are appended between the pages."""
    authz = with_tls(authz_config(servers.kafka_bootstrap, f"t{unique}.", idp), pki, "authz")
    topics, cfg = await _audit_service(pki, servers, unique, f"audit_page_{unique}", authz.grpc_bind)
    study = "1.2.840.99.7"
    actions = (A.AUDIT_ACTION_INSTANCE_RETRIEVED, A.AUDIT_ACTION_ACCESS_DECISION, A.AUDIT_ACTION_OBJECT_OPENED)
    seeded = [
        audit_pb2.AuditEvent(
            event_id=str(uuid.uuid4()),
            service="test",
            action=actions[i % 3],
            outcome=Out.AUDIT_OUTCOME_DENIED if i % 5 == 0 else Out.AUDIT_OUTCOME_SUCCESS,
            actor=f"user{i % 4}",
            study_instance_uid=study,
        )
        for i in range(40)
    ]
    producer = new_producer(servers.kafka_bootstrap, "test")
    await producer.start()
    try:
        for event in seeded:
            await producer.send(topics.audit, event.SerializeToString(), key=event.actor.encode())
        await producer.flush()
    finally:
        await producer.stop()
    auditor = idp.token("aud.ito")
    wanted_actions = [A.AUDIT_ACTION_INSTANCE_RETRIEVED, A.AUDIT_ACTION_ACCESS_DECISION]
    expected_ids = [e.event_id for e in seeded if e.action in wanted_actions]
    async with (
        running(lambda stop: run_authz(authz, stop), authz.grpc_bind, pki.tls(TEST_CLIENT)),
        running(lambda stop: run_audit(cfg, stop), cfg.grpc_bind, pki.tls(TEST_CLIENT)),
        new_channel(cfg.grpc_bind, pki.tls(TEST_CLIENT)) as ch,
    ):
        stub = audit_pb2_grpc.AuditServiceStub(ch)
        deadline = time.monotonic() + 60
        while len(await _query(stub, access_token=auditor, study_instance_uid=study)) < len(seeded):
            assert time.monotonic() < deadline, "seeded events never became queryable"
            await asyncio.sleep(0.3)

        request = audit_pb2.QueryRequest(
            access_token=auditor, study_instance_uid=study, actions=wanted_actions, page_size=4
        )
        pages: list[list[str]] = []
        while True:
            page = await stub.QueryPage(request, timeout=30)
            pages.append([r.event.event_id for r in page.records])
            if not page.next_page_token:
                break
            request.page_token = page.next_page_token
        walked = [i for p in pages for i in p]
        assert walked == expected_ids and len(set(walked)) == len(walked) == 27
        assert [len(p) for p in pages] == [4] * 6 + [3]
        # Both filters together; the same result as one Query with them.
        denied = audit_pb2.QueryRequest(
            access_token=auditor, study_instance_uid=study, outcomes=[Out.AUDIT_OUTCOME_DENIED], page_size=100
        )
        page = await stub.QueryPage(denied, timeout=30)
        denied_ids = [e.event_id for e in seeded if e.outcome == Out.AUDIT_OUTCOME_DENIED]
        assert [r.event.event_id for r in page.records] == denied_ids and page.next_page_token == ""
        streamed = await _query(stub, access_token=auditor, study_instance_uid=study)
        assert [r.event.event_id for r in streamed if r.event.outcome == Out.AUDIT_OUTCOME_DENIED] == denied_ids

        # A token continues only its own query; a physician gets no page at all.
        other = audit_pb2.QueryRequest(access_token=auditor, actor="user1", page_token=request.page_token)
        assert await _refusal(stub.QueryPage(other, timeout=30)) == grpc.StatusCode.INVALID_ARGUMENT
        unspecified = audit_pb2.QueryRequest(access_token=auditor, actions=[A.AUDIT_ACTION_UNSPECIFIED])
        assert await _refusal(stub.QueryPage(unspecified, timeout=30)) == grpc.StatusCode.INVALID_ARGUMENT
        physician = audit_pb2.QueryRequest(access_token=idp.token("dr.house"), study_instance_uid=study)
        assert await _refusal(stub.QueryPage(physician, timeout=30)) == grpc.StatusCode.PERMISSION_DENIED

        cli = await asyncio.to_thread(
            _cli,
            cfg.grpc_bind,
            auditor,
            pki,
            ["--study", study, "--action", "INSTANCE_RETRIEVED", "--action", "access_decision"],
            ["--page-size", "5", "--all-pages"],
        )
        assert cli.returncode == 0, cli.stderr
        assert [json.loads(line)["event"]["event_id"] for line in cli.stdout.splitlines()] == expected_ids
        one = await asyncio.to_thread(_cli, cfg.grpc_bind, auditor, pki, ["--study", study], ["--page-size", "5"])
        assert one.returncode == 0 and len(one.stdout.splitlines()) == 5
        assert "next_page_token: " in one.stderr


def _cli(target: str, token: str, pki: Pki, *args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **pki.env("ops"), "AUDIT_ACCESS_TOKEN": token}
    return subprocess.run(
        [sys.executable, "-m", "services.audit", "query", "--target", target, *(a for group in args for a in group)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
