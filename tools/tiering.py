"""The tiering job: moves sealed objects from the hot tier to the archive tier by a policy kept
as data, without decrypting anything.

    python -m tools.tiering run --policy deploy/policy/tiering.toml [--dry-run]

Policy (TOML): instances are archived once they were stored ``archive_after_days`` ago; a
modality may override it (mammography priors stay hot longer, say), and a rule without
``archive_after_days`` keeps that modality hot:

    [default]
    archive_after_days = 365
    [modality.MG]
    archive_after_days = 3650

Per object, in an order that a crash at any point leaves resumable and nothing lost:
1. copy the sealed bytes to the archive, published only if they hash as the hot copy does;
2. mark the instance ``tier: archive`` in the study index;
3. record ``OBJECT_TIERED`` in the audit trail (acknowledged by Kafka);
4. only then drop the hot copy.
A re-run skips what is done and finishes what is half done (an archive copy already there is
checked, not copied again). Reads stay transparent: crypto opens from whichever tier holds
the object (``CRYPTO_ARCHIVE_STORE_URL``), and reports each tier's open latency.

Environment: ``CRYPTO_STORE_URL``, ``CRYPTO_ARCHIVE_STORE_URL`` (+ ``S3_*``), ``MONGODB_URI``
and ``GATEWAY_INDEX_DATABASE`` (a user that may read and update the index), ``KAFKA_BOOTSTRAP``
and ``KAFKA_TOPIC_PREFIX`` for the audit trail.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient

from dicomsafe.common.audit_emitter import AuditEmitter
from dicomsafe.common.config import env_opt, env_secret, env_str
from dicomsafe.common.kafka import Topics, new_producer
from dicomsafe.v1 import audit_pb2
from services.crypto.object_store import StoreSettings, TierStore, copy_verified, open_store, sha256_of

ACTOR = "tiering-job"
AUDIT_ACK_TIMEOUT_S = 30.0


class PolicyError(ValueError):
    pass


@dataclass(frozen=True)
class Policy:
    # None = never archived.
    default_days: float | None
    by_modality: dict[str, float | None] = field(default_factory=dict)

    def days_for(self, modality: str) -> tuple[float | None, str]:
        """(days after storing, the rule's name) for an instance of ``modality``."""
        if modality in self.by_modality:
            return self.by_modality[modality], f"modality.{modality}"
        return self.default_days, "default"


def _days(table: dict[str, Any], where: str) -> float | None:
    value = table.get("archive_after_days")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise PolicyError(f"{where}.archive_after_days must be a number of days >= 0")
    return float(value)


def load_policy(path: Path) -> Policy:
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    unknown = set(data) - {"default", "modality"}
    if unknown:
        raise PolicyError(f"unknown policy sections: {sorted(unknown)}")
    modalities = data.get("modality", {})
    return Policy(
        default_days=_days(data.get("default", {}), "default"),
        by_modality={m.upper(): _days(rule, f"modality.{m}") for m, rule in modalities.items()},
    )


@dataclass
class Report:
    considered: int = 0
    due: int = 0
    moved: int = 0
    resumed: int = 0
    bytes_moved: int = 0
    seconds: float = 0.0
    by_rule: dict[str, int] = field(default_factory=dict)


async def _due(index: Any, policy: Policy, now: dt.datetime) -> tuple[int, list[tuple[dict[str, Any], str]]]:
    """(instances considered, [(instance, rule) due for the archive])."""
    modality_of = {
        str(s["_id"]): str(s.get("match", {}).get("Modality", "")).upper()
        async for s in index["series"].find({}, {"match.Modality": 1})
    }
    considered, due = 0, []
    query = {"tier": {"$ne": "archive"}}
    projection = {"object_id": 1, "series_uid": 1, "study_uid": 1, "stored_at": 1, "size": 1, "patient_ref": 1}
    async for inst in index["instances"].find(query, projection, sort=[("_id", 1)]):
        considered += 1
        days, rule = policy.days_for(modality_of.get(str(inst.get("series_uid", "")), ""))
        stored_at = inst.get("stored_at")
        if days is None or not isinstance(stored_at, dt.datetime):
            continue
        if stored_at.replace(tzinfo=dt.UTC) <= now - dt.timedelta(days=days):
            due.append((inst, rule))
    return considered, due


async def run(
    policy: Policy,
    hot: TierStore,
    archive: TierStore,
    index: Any,
    audit: AuditEmitter,
    now: dt.datetime | None = None,
    dry_run: bool = False,
) -> Report:
    started = time.monotonic()
    report = Report()
    report.considered, due = await _due(index, policy, now or dt.datetime.now(dt.UTC))
    report.due = len(due)
    if dry_run:
        report.seconds = time.monotonic() - started
        return report
    for inst, rule in due:
        object_id = str(inst["object_id"])
        in_hot = await asyncio.to_thread(hot.exists, object_id)
        if in_hot:
            sha = await asyncio.to_thread(sha256_of, hot, object_id)
            archived = await asyncio.to_thread(archive.exists, object_id)
            if not archived or await asyncio.to_thread(sha256_of, archive, object_id) != sha:
                await asyncio.to_thread(copy_verified, hot, archive, object_id, sha)
                report.bytes_moved += int(inst.get("size", 0))
        elif not await asyncio.to_thread(archive.exists, object_id):
            continue  # in neither tier (not stored yet, or gone): nothing to move
        else:
            report.resumed += 1  # copied and dropped before; the index was not updated yet
        now_ = dt.datetime.now(dt.UTC)
        await index["instances"].update_one(
            {"_id": inst["_id"], "object_id": object_id}, {"$set": {"tier": "archive", "archived_at": now_}}
        )
        await asyncio.wait_for(
            audit.emit(
                audit_pb2.AuditAction.AUDIT_ACTION_OBJECT_TIERED,
                audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS,
                ACTOR,
                study_instance_uid=str(inst.get("study_uid", "")),
                sop_instance_uid=str(inst["_id"]),
                object_id=object_id,
                patient_ref=str(inst.get("patient_ref", "")),
                details={"from": "hot", "to": "archive", "rule": rule},
            ),
            AUDIT_ACK_TIMEOUT_S,
        )
        if in_hot:
            await asyncio.to_thread(hot.remove, object_id)
        report.moved += 1
        report.by_rule[rule] = report.by_rule.get(rule, 0) + 1
    report.seconds = time.monotonic() - started
    return report


async def _main(policy_path: Path, dry_run: bool) -> Report:
    from services.crypto.config import archive_from_env, store_from_env

    archive_settings: StoreSettings | None = archive_from_env()
    if archive_settings is None:
        raise PolicyError("CRYPTO_ARCHIVE_STORE_URL is not set: there is no archive tier")
    policy = load_policy(policy_path)
    hot, archive = open_store(store_from_env()), open_store(archive_settings)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(env_secret("MONGODB_URI") or env_str("MONGODB_URI"))
    index = client[env_opt("GATEWAY_INDEX_DATABASE") or "dicomsafe_index"]
    producer = new_producer(env_str("KAFKA_BOOTSTRAP"), "dicomsafe-tiering")
    await producer.start()
    try:
        audit = AuditEmitter(producer, "tiering", Topics(env_opt("KAFKA_TOPIC_PREFIX")).audit)
        return await run(policy, hot, archive, index, audit, dry_run=dry_run)
    finally:
        await producer.stop()
        await client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("run", help="move what the policy says is due to the archive tier")
    cmd.add_argument("--policy", type=Path, required=True)
    cmd.add_argument("--dry-run", action="store_true", help="count what is due, move nothing")
    args = parser.parse_args(argv)
    try:
        r = asyncio.run(_main(args.policy, args.dry_run))
    except PolicyError as exc:
        print(f"tiering: {exc}", file=sys.stderr)
        return 2
    print(
        f"{r.considered} hot instances, {r.due} due, {r.moved} moved ({r.resumed} resumed), "
        f"{r.bytes_moved} bytes, {r.seconds:.1f}s; by rule: {r.by_rule}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
