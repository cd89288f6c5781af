"""The operator CLI of the audit service against a real MongoDB-wire server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient

from dicomsafe.common.token_fingerprint import token_fingerprint
from dicomsafe.v1 import audit_pb2
from services.audit.store import COLLECTION, AuditStore
from tests.servers import Servers

REPO = Path(__file__).resolve().parents[2]


def _cli(servers: Servers, database: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "MONGODB_URI": servers.mongodb_uri,
        "AUDIT_MONGODB_DB": database,
        "KAFKA_BOOTSTRAP": servers.kafka_bootstrap,
        "AUDIT_CHECKPOINTS": "disabled",
    }
    return subprocess.run(
        [sys.executable, "-m", "services.audit", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


async def test_verify_export_and_exposure_commands(servers: Servers, unique: str, tmp_path: Path) -> None:
    database = f"audit_cli_{unique}"
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(servers.mongodb_uri)
    try:
        store = AuditStore(client, database)
        await store.ensure_indexes()
        events = []
        for i in range(4):
            event = audit_pb2.AuditEvent(
                event_id=str(uuid.uuid4()),
                service="gateway",
                action=audit_pb2.AuditAction.AUDIT_ACTION_INSTANCE_RETRIEVED,
                outcome=audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS,
                actor="dr.house",
                study_instance_uid=f"1.2.3.{i}",
                patient_ref=f"{i:032x}",
                details={"purpose": "treatment"},
            )
            event.occurred_at.GetCurrentTime()
            events.append(event)
        await store.append_many("audit.events:0", events)

        ok = await asyncio.to_thread(_cli, servers, database, "verify")
        assert ok.returncode == 0, ok.stderr
        assert "4 records in 1 chains" in ok.stdout and "OK" in ok.stdout
        assert ok.stderr == ""  # not a terminal: no progress bar unless asked
        shown = await asyncio.to_thread(_cli, servers, database, "verify", "--progress")
        assert shown.returncode == 0 and shown.stdout == ok.stdout
        last_frame = shown.stderr.rstrip("\n").rsplit("\r", 1)[-1]
        assert "100%" in last_frame and "4/4 records" in last_frame

        fhir = await asyncio.to_thread(_cli, servers, database, "export", "--format", "fhir", "--actor", "dr.house")
        resources = [json.loads(line) for line in fhir.stdout.splitlines()]
        assert [r["id"] for r in resources] == [e.event_id for e in events]
        assert all(r["resourceType"] == "AuditEvent" and r["type"]["code"] == "110104" for r in resources)

        dicom = await asyncio.to_thread(
            _cli, servers, database, "export", "--format", "dicom", "--patient-ref", f"{2:032x}"
        )
        assert dicom.stdout.count("<AuditMessage>") == 1 and "1.2.3.2" in dicom.stdout

        exposure = await asyncio.to_thread(_cli, servers, database, "exposure", "--actor", "dr.house")
        assert "4 disclosures, 4 patients, 4 studies" in exposure.stdout
        leaked = tmp_path / "leaked-token"
        leaked.write_text("eyJ.a.token.nobody.used\n")
        by_token = await asyncio.to_thread(_cli, servers, database, "exposure", "--token-file", str(leaked))
        assert f"token {token_fingerprint('eyJ.a.token.nobody.used')}: 0 disclosures" in by_token.stdout
        assert "eyJ" not in by_token.stdout + by_token.stderr

        report = await asyncio.to_thread(_cli, servers, database, "report", "--many-patients", "3")
        assert "4 events examined" in report.stdout
        assert "many_patients  dr.house" in report.stdout

        await client[database][COLLECTION].update_one({"seq": 2}, {"$set": {"event.actor": "someone.else"}})
        broken = await asyncio.to_thread(_cli, servers, database, "verify")
        assert broken.returncode == 1
        assert "BROKEN audit.events:0 at seq 2: content does not match its hash" in broken.stdout
    finally:
        await client.drop_database(database)
        await client.close()
