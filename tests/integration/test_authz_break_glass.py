"""Emergency overrides are announced when they start and when they stop — once, across restarts.

Real service, real Kafka, real MongoDB, real tokens. A break-glass grant lasts 30 minutes; to
have one run out while authz is down, the test moves the grant's end into the past in the grant
store while the service is stopped (what 30 minutes of downtime would leave behind).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

from pymongo import AsyncMongoClient

from dicomsafe.common.kafka import Topics, ensure_topics, topic_specs
from dicomsafe.v1 import alerts_pb2, audit_pb2, authz_pb2, authz_pb2_grpc
from services.authz.break_glass import started_event_id, stopped_event_id
from services.authz.grants import COLLECTION
from tests.servers import Servers
from tests.service_runner import authz_config, running_authz
from tests.topic_reader import read_to_end
from tools.oidc_issuer import LocalIssuer
from tools.pki import Pki

STUDIES = {"revoked": "1.2.840.10008.31", "expired_down": "1.2.840.10008.32", "expired_later": "1.2.840.10008.33"}
OVERRIDE = audit_pb2.AuditAction.AUDIT_ACTION_EMERGENCY_OVERRIDE


async def _wait_marked(grants: Any, grant_id: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        doc = await grants.find_one({"grant_id": grant_id})
        if doc and doc.get("stop_announced_at"):
            return
        await asyncio.sleep(0.2)
    raise AssertionError("stop never announced")


async def test_override_started_and_stopped_once_across_restarts(
    pki: Pki, servers: Servers, idp: LocalIssuer, unique: str
) -> None:
    topics = Topics(f"t{unique}.")
    await ensure_topics(servers.kafka_bootstrap, topic_specs(topics, partitions=1))
    cfg = authz_config(
        servers.kafka_bootstrap,
        topics.prefix,
        idp,
        mongodb_uri=servers.mongodb_uri,
        mongodb_db=f"authz_{unique}",
        break_glass_sweep_s=1.0,
    )
    er = authz_pb2.Subject(access_token=idp.token("dr.er", amr=["pwd", "otp"]))
    admin = authz_pb2.Subject(access_token=idp.token("reg.omar"))

    async def can_read(stub: authz_pb2_grpc.AuthzServiceAsyncStub, study: str) -> bool:
        resource = authz_pb2.Resource(type="instance", study_instance_uid=study)
        reply = await stub.Check(authz_pb2.CheckRequest(subject=er, action="instance.read", resource=resource))
        return bool(reply.allow)

    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(servers.mongodb_uri)
    grants = mongo[cfg.mongodb_db][COLLECTION]

    async def end_while_down(grant_id: str) -> None:
        past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        await grants.update_one({"grant_id": grant_id}, {"$set": {"not_after": past}})

    ids: dict[str, str] = {}
    try:
        async with running_authz(cfg, pki) as stub:
            for name, study in STUDIES.items():
                grant = await stub.BreakGlass(
                    authz_pb2.BreakGlassRequest(caller=er, study_instance_uid=study, reason="trauma bay 2")
                )
                ids[name] = grant.grant_id
                assert await can_read(stub, study)
            await stub.RevokeGrant(
                authz_pb2.RevokeGrantRequest(caller=admin, grant_id=ids["revoked"], reason="patient stable")
            )
            assert not await can_read(stub, STUDIES["revoked"])
            await _wait_marked(grants, ids["revoked"])
        await end_while_down(ids["expired_down"])

        async with running_authz(cfg, pki) as stub:
            await _wait_marked(grants, ids["expired_down"])
            assert not await can_read(stub, STUDIES["expired_down"])
            assert await can_read(stub, STUDIES["expired_later"])
        await end_while_down(ids["expired_later"])

        # The third start's sweep finds only the grant that ended since; the two announced
        # before are not announced again (the marker), which the exact counts below prove.
        async with running_authz(cfg, pki):
            await _wait_marked(grants, ids["expired_later"])
    finally:
        await mongo.drop_database(cfg.mongodb_db)
        await mongo.close()

    events = [audit_pb2.AuditEvent.FromString(v) for v in await read_to_end(servers.kafka_bootstrap, topics.audit)]
    overrides = [e for e in events if e.action == OVERRIDE]
    assert len(overrides) == 6  # three started, three stopped: nothing twice
    for name, study in STUDIES.items():
        mine = [e for e in overrides if e.details["grant_id"] == ids[name]]
        assert [e.details["override"] for e in mine] == ["started", "stopped"], name
        started, stopped = mine
        assert started.event_id == started_event_id(ids[name]) and started.details["event_type_code"] == "110127"
        assert stopped.event_id == stopped_event_id(ids[name]) and stopped.details["event_type_code"] == "110138"
        assert started.actor == stopped.actor == "dr.er" and stopped.study_instance_uid == study
        assert stopped.details["ended"] == ("revoked" if name == "revoked" else "expired")
        assert stopped.reason == f"emergency override stopped: {stopped.details['ended']}"

    alerts = [alerts_pb2.SecurityAlert.FromString(v) for v in await read_to_end(servers.kafka_bootstrap, topics.alerts)]
    assert sorted(a.rule for a in alerts) == ["break_glass_started"] * 3 + ["break_glass_stopped"] * 3
    assert len({a.alert_id for a in alerts}) == 6
    for name in STUDIES:
        raised = [a for a in alerts if ids[name] in a.summary]
        assert [a.rule for a in raised] == ["break_glass_started", "break_glass_stopped"]
        started_alert, stopped_alert = raised
        assert started_alert.severity == "critical" and stopped_alert.severity == "warning"
        assert list(started_alert.evidence_event_ids) == [started_event_id(ids[name])]
        assert list(stopped_alert.evidence_event_ids) == [started_event_id(ids[name]), stopped_event_id(ids[name])]
        assert started_alert.subjects == ["dr.er"] and started_alert.source == "authz"
        # The clinician's free-text reason stays in the audit trail, out of the alert.
        assert "trauma" not in started_alert.summary
