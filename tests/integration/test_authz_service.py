"""authz over real gRPC and Kafka: every decision is audited before the answer; no audit, no answer."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import re
import time
from pathlib import Path

import grpc
import pytest
from aiokafka import AIOKafkaConsumer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dicomsafe.common.grpc_runtime import new_channel
from dicomsafe.common.kafka import Topics, ensure_topics, topic_specs
from dicomsafe.v1 import audit_pb2, authz_pb2, authz_pb2_grpc
from services.authz.app import run
from services.authz.config import AuthzConfig
from services.authz.service import SERVICE_NAME
from tests.servers import Servers
from tests.service_runner import TEST_CLIENT, running, with_tls
from tools.pki import Pki
from tools.ports import free_port
from tools.stack import POLICY_FILE


def _check(subject: str, action: str = "instance.read") -> authz_pb2.CheckRequest:
    return authz_pb2.CheckRequest(
        subject=authz_pb2.Subject(id=subject),
        action=action,
        resource=authz_pb2.Resource(type="instance", study_instance_uid="1.2.3", object_id="ab" * 16),
        context={"purpose": "treatment"},
    )


async def test_decisions_are_answered_and_audited(pki: Pki, servers: Servers, unique: str) -> None:
    topics = Topics(f"t{unique}.")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=1))
    cfg = with_tls(
        AuthzConfig(f"127.0.0.1:{free_port()}", POLICY_FILE, servers.kafka_bootstrap, topics.prefix), pki, "authz"
    )
    async with (
        running(lambda stop: run(cfg, stop), cfg.grpc_bind, pki.tls(TEST_CLIENT)),
        new_channel(cfg.grpc_bind, pki.tls(TEST_CLIENT)) as ch,
    ):
        stub = authz_pb2_grpc.AuthzServiceStub(ch)
        allowed = await stub.Check(_check("dr.house"))
        denied = await stub.Check(_check("res.rao"))
        deidentified = await stub.Check(_check("res.rao", "instance.read_deidentified"))
        with pytest.raises(grpc.aio.AioRpcError) as no_subject:
            await stub.Check(authz_pb2.CheckRequest(action="instance.read"))
        with pytest.raises(grpc.aio.AioRpcError) as no_action:
            await stub.Check(authz_pb2.CheckRequest(subject=authz_pb2.Subject(id="dr.house")))
        clear_patient_id = _check("dr.house")
        clear_patient_id.resource.patient_ref = "MRN-0042"
        with pytest.raises(grpc.aio.AioRpcError) as not_a_pseudonym:
            await stub.Check(clear_patient_id)
    assert allowed.allow and allowed.roles == ["radiologist"] and allowed.policy_version == "2026-12-07.1"
    assert allowed.reason_code == "granted" and allowed.obligations == [] and allowed.subject == "dr.house"
    assert not denied.allow and denied.reason == "no role of the subject grants instance.read"
    assert denied.reason_code == "no_role" and denied.roles == ["researcher"]
    assert deidentified.allow and deidentified.obligations == ["deidentify"]
    assert len({allowed.decision_id, denied.decision_id, deidentified.decision_id}) == 3
    assert no_subject.value.code() == no_action.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not_a_pseudonym.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    consumer = AIOKafkaConsumer(topics.audit, bootstrap_servers=servers.kafka_bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    events: list[audit_pb2.AuditEvent] = []
    deadline = time.monotonic() + 30
    try:
        while len(events) < 3 and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                events.extend(audit_pb2.AuditEvent.FromString(r.value) for r in records)
    finally:
        await consumer.stop()
    # Exactly the three decisions: the invalid requests were refused before any decision.
    assert len(events) == 3
    by_decision = {e.details["decision_id"]: e for e in events}
    assert set(by_decision) == {allowed.decision_id, denied.decision_id, deidentified.decision_id}
    for event in events:
        assert event.service == "authz"
        assert event.action == audit_pb2.AuditAction.AUDIT_ACTION_ACCESS_DECISION
        assert event.details["policy_version"] == "2026-12-07.1"
        assert event.details["purpose"] == "treatment"
        assert event.study_instance_uid == "1.2.3"
    ok, no = by_decision[allowed.decision_id], by_decision[denied.decision_id]
    assert ok.outcome == audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS
    assert (ok.actor, list(ok.actor_roles), ok.details["action"]) == ("dr.house", ["radiologist"], "instance.read")
    assert no.outcome == audit_pb2.AuditOutcome.AUDIT_OUTCOME_DENIED
    assert (no.actor, no.reason, no.details["action"]) == (
        "res.rao",
        "no role of the subject grants instance.read",
        "instance.read",
    )
    assert by_decision[deidentified.decision_id].outcome == audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS


async def test_many_checks_in_one_call_are_each_decided_and_audited(pki: Pki, servers: Servers, unique: str) -> None:
    topics = Topics(f"t{unique}.")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=1))
    cfg = with_tls(
        AuthzConfig(f"127.0.0.1:{free_port()}", POLICY_FILE, servers.kafka_bootstrap, topics.prefix), pki, "authz"
    )
    checks = [
        _check("dr.house"),
        _check("res.rao"),
        _check("res.rao", "instance.read_deidentified"),
        _check("mallory"),
        _check("dr.house", "audit.read"),
    ]
    async with (
        running(lambda stop: run(cfg, stop), cfg.grpc_bind, pki.tls(TEST_CLIENT)),
        new_channel(cfg.grpc_bind, pki.tls(TEST_CLIENT)) as ch,
    ):
        stub = authz_pb2_grpc.AuthzServiceStub(ch)
        one_by_one = [await stub.Check(check) for check in checks]
        together = (await stub.CheckMany(authz_pb2.CheckManyRequest(checks=checks))).results
        assert (await stub.CheckMany(authz_pb2.CheckManyRequest())).results == []
        # All or nothing: a malformed check refuses the call before anything is decided.
        with pytest.raises(grpc.aio.AioRpcError) as malformed:
            await stub.CheckMany(authz_pb2.CheckManyRequest(checks=[_check("dr.house"), authz_pb2.CheckRequest()]))
        with pytest.raises(grpc.aio.AioRpcError) as too_many:
            await stub.CheckMany(authz_pb2.CheckManyRequest(checks=[_check("dr.house")] * 257))
    assert malformed.value.code() == too_many.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (malformed.value.details() or "").startswith("checks[1]: ")

    def answer(r: authz_pb2.CheckResponse) -> tuple[object, ...]:
        return (r.allow, r.reason_code, r.reason, tuple(r.obligations), tuple(r.roles), r.subject, r.policy_version)

    # In order, and the same answers as one call per check.
    assert [answer(r) for r in together] == [answer(r) for r in one_by_one]
    assert [r.allow for r in together] == [True, False, True, False, False]
    assert len({r.decision_id for r in [*together, *one_by_one]}) == 2 * len(checks)

    consumer = AIOKafkaConsumer(topics.audit, bootstrap_servers=servers.kafka_bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    events: list[audit_pb2.AuditEvent] = []
    deadline = time.monotonic() + 30
    try:
        while len(events) < 2 * len(checks) and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                events.extend(audit_pb2.AuditEvent.FromString(r.value) for r in records)
        # Nothing more arrives: the refused calls decided (and audited) nothing.
        for records in (await consumer.getmany(timeout_ms=2000)).values():
            events.extend(audit_pb2.AuditEvent.FromString(r.value) for r in records)
    finally:
        await consumer.stop()
    assert len(events) == 2 * len(checks)
    by_decision = {e.details["decision_id"]: e for e in events}
    for check, result in zip(checks, together, strict=True):
        event = by_decision[result.decision_id]
        assert (event.actor, event.details["action"]) == (check.subject.id, check.action)
        ok = audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS
        assert (event.outcome == ok) == result.allow


async def test_no_audit_trail_means_no_answer(pki: Pki, servers: Servers, unique: str) -> None:
    topics = Topics(f"t{unique}.")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=1))
    cfg = with_tls(
        AuthzConfig(f"127.0.0.1:{free_port()}", POLICY_FILE, servers.kafka_bootstrap, topics.prefix), pki, "authz"
    )
    async with (
        running(lambda stop: run(cfg, stop), cfg.grpc_bind, pki.tls(TEST_CLIENT)),
        new_channel(cfg.grpc_bind, pki.tls(TEST_CLIENT)) as ch,
    ):
        stub = authz_pb2_grpc.AuthzServiceStub(ch)
        assert (await stub.Check(_check("dr.house"))).allow
        # The audit topic disappears under the running service: decisions can no longer be recorded.
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=servers.kafka_bootstrap)
        await admin.start()
        try:
            await admin.delete_topics([topics.audit])
        finally:
            await admin.close()
        await asyncio.sleep(1)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Check(_check("dr.house"), timeout=60)
        # The topic returns, so the abandoned send is delivered (over-reported, never missed)
        # instead of holding up shutdown until the producer gives up on it.
        await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=1))
    # The service bounds its wait for the acknowledgement (AUTHZ_AUDIT_TIMEOUT_S) and says so.
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def _wait_listening(pki: Pki, target: str, task: asyncio.Task[None]) -> None:
    """The gRPC port answers (health may say NOT_SERVING); re-raises if the service died."""
    async with new_channel(target, pki.tls(TEST_CLIENT)) as channel:
        ready = asyncio.ensure_future(channel.channel_ready())
        try:
            done, _ = await asyncio.wait([ready, task], timeout=60, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
    if task in done:
        task.result()
        raise RuntimeError("authz stopped before listening")
    assert ready in done, f"authz at {target} not listening"


async def test_without_kafka_no_check_is_answered(pki: Pki, unique: str) -> None:
    """Nothing listens at the bootstrap address: authz serves, but fails closed on every call."""
    cfg = with_tls(
        AuthzConfig(f"127.0.0.1:{free_port()}", POLICY_FILE, "127.0.0.1:1", f"t{unique}.", audit_timeout_s=2.0),
        pki,
        "authz",
    )
    stop = asyncio.Event()
    task = asyncio.create_task(run(cfg, stop))
    try:
        await _wait_listening(pki, cfg.grpc_bind, task)
        async with new_channel(cfg.grpc_bind, pki.tls(TEST_CLIENT)) as ch:
            stub = authz_pb2_grpc.AuthzServiceStub(ch)
            for subject in ("dr.house", "res.rao"):  # an allow and a deny alike
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Check(_check(subject), timeout=30)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert err.value.details() == "audit trail unavailable"
            # Several checks at once: no decision of the call is handed out, the allow included.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                batch = authz_pb2.CheckManyRequest(checks=[_check("dr.house"), _check("res.rao")])
                await stub.CheckMany(batch, timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert err.value.details() == "audit trail unavailable"
            # Readiness tells load balancers to route elsewhere while the audit trail is out of reach.
            health = health_pb2_grpc.HealthStub(ch)
            status = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert not task.done()  # still running, still trying to reach Kafka
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=60)


async def test_policy_reloads_without_restart_and_a_bad_file_changes_nothing(
    pki: Pki, servers: Servers, unique: str, tmp_path: Path
) -> None:
    topics = Topics(f"t{unique}.")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=1))
    policy = tmp_path / "policy.toml"
    original = POLICY_FILE.read_text(encoding="utf-8")
    policy.write_text(original, encoding="utf-8")
    cfg = with_tls(
        AuthzConfig(f"127.0.0.1:{free_port()}", policy, servers.kafka_bootstrap, topics.prefix, policy_reload_s=1),
        pki,
        "authz",
    )
    async with (
        running(lambda stop: run(cfg, stop), cfg.grpc_bind, pki.tls(TEST_CLIENT)),
        new_channel(cfg.grpc_bind, pki.tls(TEST_CLIENT)) as ch,
    ):
        stub = authz_pb2_grpc.AuthzServiceStub(ch)
        assert (await stub.Check(_check("dr.wilson"))).allow
        # The hospital withdraws image access from referring physicians.
        changed = re.sub(
            r'(\[roles\.referring_physician\]\n[^\[]*?actions = \[)"instance\.read", ',
            r"\1",
            original.replace('version = "2026-12-07.1"', 'version = "2026-12-07.2"'),
        )
        assert '"instance.read"' not in changed.split("[roles.referring_physician]")[1].split("[roles.")[0]
        assert changed != original
        policy.write_text(changed, encoding="utf-8")
        deadline = time.monotonic() + 30
        decision = await stub.Check(_check("dr.wilson"))
        while decision.allow and time.monotonic() < deadline:
            await asyncio.sleep(0.3)
            decision = await stub.Check(_check("dr.wilson"))
        assert not decision.allow and decision.policy_version == "2026-12-07.2"

        policy.write_text("version = ", encoding="utf-8")  # a broken edit
        await asyncio.sleep(2.5)
        still = await stub.Check(_check("dr.house"))
        assert still.allow and still.policy_version == "2026-12-07.2"

    consumer = AIOKafkaConsumer(topics.audit, bootstrap_servers=servers.kafka_bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    changes: list[audit_pb2.AuditEvent] = []
    try:
        deadline = time.monotonic() + 20
        while len(changes) < 2 and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                events = [audit_pb2.AuditEvent.FromString(r.value) for r in records]
                changes += [e for e in events if e.action == audit_pb2.AuditAction.AUDIT_ACTION_POLICY_CHANGED]
    finally:
        await consumer.stop()
    assert [e.outcome for e in changes] == [
        audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS,
        audit_pb2.AuditOutcome.AUDIT_OUTCOME_FAILURE,
    ]
    assert changes[0].details["to_version"] == "2026-12-07.2"


async def test_a_dicom_peer_is_decided_only_on_a_vouching_service_s_word(
    pki: Pki, servers: Servers, unique: str
) -> None:
    """``Subject.dimse_peer``: the peer's policy roles decide, but only when the calling workload
    (its mTLS identity) may vouch for DICOM peers; anyone else naming a peer is unauthenticated."""
    topics = Topics(f"t{unique}.")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=1))
    base = with_tls(
        AuthzConfig(f"127.0.0.1:{free_port()}", POLICY_FILE, servers.kafka_bootstrap, topics.prefix), pki, "authz"
    )
    peer = authz_pb2.CheckRequest(
        subject=authz_pb2.Subject(dimse_peer="reading-ws1"),
        action="instance.read",
        resource=authz_pb2.Resource(type="study", study_instance_uid="1.2.3"),
    )
    answers = []
    for vouchers in (frozenset({TEST_CLIENT}), frozenset({"gateway"})):
        cfg = dataclasses.replace(base, grpc_bind=f"127.0.0.1:{free_port()}", dimse_vouchers=vouchers)
        async with (
            running(functools.partial(run, cfg), cfg.grpc_bind, pki.tls(TEST_CLIENT)),
            new_channel(cfg.grpc_bind, pki.tls(TEST_CLIENT)) as ch,
        ):
            stub = authz_pb2_grpc.AuthzServiceStub(ch)
            answers.append(await stub.Check(peer))
            both = authz_pb2.CheckRequest()
            both.CopyFrom(peer)
            both.subject.id = "dr.house"
            answers.append(await stub.Check(both))
    vouched, with_an_id, unvouched, _ = answers
    assert (vouched.allow, vouched.subject, list(vouched.roles)) == (True, "dimse:reading-ws1", ["dimse_workstation"])
    assert (with_an_id.allow, with_an_id.reason_code) == (False, "unauthenticated")
    assert (unvouched.allow, unvouched.reason_code) == (False, "unauthenticated")
    assert unvouched.reason == "unauthenticated: this caller may not vouch for DICOM peers"
