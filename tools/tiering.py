"""The tiering job: moves sealed objects from the hot tier to the archive tier by a policy kept
as data, without decrypting anything.

    python -m tools.tiering run --policy deploy/policy/tiering.toml [--dry-run]
    python -m tools.tiering recall --study UID [--series UID] --reason TEXT [--keep-days N]

Policy (TOML): an instance is archived once it was stored ``archive_after_days`` ago, or once
its study was not read for ``archive_idle_days`` (the gateway records a study's last read,
to the hour), whichever comes first; a modality may override the default rule (mammography
priors stay hot longer, say), and a rule with neither keeps that modality hot:

    [default]
    archive_after_days = 365
    archive_idle_days = 90
    [modality.MG]
    archive_after_days = 3650

``provision`` creates the job's database user (find and update in the index only).
``recall`` brings a study back to the hot tier ahead of its use (priors for a scheduled
comparison) and holds it there ``--keep-days``; reads never need it (they are served from
either tier), it only saves the archive's latency.

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
import secrets
import sys
import time
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pymongo import AsyncMongoClient

from dicomsafe.common.audit_emitter import AuditEmitter
from dicomsafe.common.config import env_opt, env_secret, env_str
from dicomsafe.common.kafka import Topics, new_producer
from dicomsafe.common.mongo_users import ensure_role_and_user, provision_with_password_file
from dicomsafe.storage.object_store import StoreSettings, TierStore, copy_verified, open_store, sha256_of
from dicomsafe.v1 import audit_pb2

ACTOR = "tiering-job"
INDEX_ROLE = "dicomsafe-tiering-index"
INDEX_USER = "dicomsafe-tiering"
# Reads the index, marks instances' tier; never inserts or deletes an entry.
INDEX_ACTIONS = ["find", "update"]
AUDIT_ACK_TIMEOUT_S = 30.0
_T = TypeVar("_T")
# How long a recalled study stays hot before the policy may archive it again.
DEFAULT_KEEP_DAYS = 30.0


class PolicyError(ValueError):
    pass


@dataclass(frozen=True)
class Rule:
    """When an instance is due for the archive: ``after_days`` after it was stored, or once its
    study was not read for ``idle_days`` (whichever comes first); neither set = stays hot."""

    name: str
    after_days: float | None = None
    idle_days: float | None = None

    def why_due(self, stored_at: dt.datetime, last_read: dt.datetime, now: dt.datetime) -> str:
        """ "age", "idle", or "" when not due."""
        if self.after_days is not None and stored_at <= now - dt.timedelta(days=self.after_days):
            return "age"
        if self.idle_days is not None and last_read <= now - dt.timedelta(days=self.idle_days):
            return "idle"
        return ""


@dataclass(frozen=True)
class Policy:
    default: Rule = Rule("default")
    by_modality: dict[str, Rule] = field(default_factory=dict)

    def rule_for(self, modality: str) -> Rule:
        return self.by_modality.get(modality, self.default)


def _days(table: dict[str, Any], key: str, where: str) -> float | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise PolicyError(f"{where}.{key} must be a number of days >= 0")
    return float(value)


def _rule(table: dict[str, Any], where: str) -> Rule:
    unknown = set(table) - {"archive_after_days", "archive_idle_days"}
    if unknown:
        raise PolicyError(f"{where}: unknown settings {sorted(unknown)}")
    return Rule(where, _days(table, "archive_after_days", where), _days(table, "archive_idle_days", where))


def load_policy(path: Path) -> Policy:
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    unknown = set(data) - {"default", "modality"}
    if unknown:
        raise PolicyError(f"unknown policy sections: {sorted(unknown)}")
    modalities = data.get("modality", {})
    return Policy(
        default=_rule(data.get("default", {}), "default"),
        by_modality={m.upper(): _rule(rule, f"modality.{m.upper()}") for m, rule in modalities.items()},
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


@dataclass(frozen=True)
class Due:
    instance: dict[str, Any]
    rule: str
    why: str  # "age" | "idle"


def _utc(when: Any) -> dt.datetime | None:
    return when.replace(tzinfo=dt.UTC) if isinstance(when, dt.datetime) else None


async def _due(index: Any, policy: Policy, now: dt.datetime) -> tuple[int, list[Due]]:
    """(instances considered, those due for the archive)."""
    modality_of = {
        str(s["_id"]): str(s.get("match", {}).get("Modality", "")).upper()
        async for s in index["series"].find({}, {"match.Modality": 1})
    }
    read_at = {
        str(s["_id"]): when
        async for s in index["studies"].find({"accessed_at": {"$exists": True}}, {"accessed_at": 1})
        if (when := _utc(s.get("accessed_at")))
    }
    considered, due = 0, []
    query = {"tier": {"$ne": "archive"}}
    projection = {
        "object_id": 1,
        "series_uid": 1,
        "study_uid": 1,
        "stored_at": 1,
        "size": 1,
        "patient_ref": 1,
        "hot_until": 1,
    }
    async for inst in index["instances"].find(query, projection, sort=[("_id", 1)]):
        considered += 1
        stored_at = _utc(inst.get("stored_at"))
        hot_until = _utc(inst.get("hot_until"))
        if stored_at is None or (hot_until is not None and hot_until > now):
            continue  # not stored yet, or recalled and held hot for a while
        rule = policy.rule_for(modality_of.get(str(inst.get("series_uid", "")), ""))
        last_read = max(stored_at, read_at.get(str(inst.get("study_uid", "")), stored_at))
        if why := rule.why_due(stored_at, last_read, now):
            due.append(Due(inst, rule.name, why))
    return considered, due


async def _audit_move(audit: AuditEmitter, inst: dict[str, Any], object_id: str, details: dict[str, str]) -> None:
    await asyncio.wait_for(
        audit.emit(
            audit_pb2.AuditAction.AUDIT_ACTION_OBJECT_TIERED,
            audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS,
            ACTOR,
            study_instance_uid=str(inst.get("study_uid", "")),
            sop_instance_uid=str(inst["_id"]),
            object_id=object_id,
            patient_ref=str(inst.get("patient_ref", "")),
            details=details,
        ),
        AUDIT_ACK_TIMEOUT_S,
    )


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
    for item in due:
        inst = item.instance
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
        await index["instances"].update_one(
            {"_id": inst["_id"], "object_id": object_id},
            {"$set": {"tier": "archive", "archived_at": dt.datetime.now(dt.UTC)}, "$unset": {"hot_until": ""}},
        )
        await _audit_move(audit, inst, object_id, {"from": "hot", "to": "archive", "rule": item.rule, "why": item.why})
        if in_hot:
            await asyncio.to_thread(hot.remove, object_id)
        report.moved += 1
        report.by_rule[item.rule] = report.by_rule.get(item.rule, 0) + 1
    report.seconds = time.monotonic() - started
    return report


@dataclass
class RecallReport:
    instances: int = 0
    copied: int = 0
    bytes_copied: int = 0
    seconds: float = 0.0


async def recall(
    hot: TierStore,
    archive: TierStore,
    index: Any,
    audit: AuditEmitter,
    study_uid: str,
    reason: str,
    keep_days: float = DEFAULT_KEEP_DAYS,
    series_uid: str = "",
) -> RecallReport:
    """Brings a study (or one series) back to the hot tier ahead of its use, e.g. priors for a
    scheduled comparison, and keeps it there ``keep_days`` (the policy leaves it alone until
    then). The archive copy stays: under Object Lock it must, and it is the copy the next move
    finds already in place. Same order as a move: copy verified, index, audit."""
    if not reason.strip():
        raise PolicyError("a recall states its reason (it is recorded in the audit trail)")
    started = time.monotonic()
    report = RecallReport()
    query: dict[str, Any] = {"study_uid": study_uid, "tier": "archive"}
    if series_uid:
        query["series_uid"] = series_uid
    hold = dt.datetime.now(dt.UTC) + dt.timedelta(days=keep_days)
    async for inst in index["instances"].find(query, sort=[("_id", 1)]):
        object_id = str(inst["object_id"])
        if not await asyncio.to_thread(hot.exists, object_id):
            sha = await asyncio.to_thread(sha256_of, archive, object_id)
            await asyncio.to_thread(copy_verified, archive, hot, object_id, sha)
            report.copied += 1
            report.bytes_copied += int(inst.get("size", 0))
        await index["instances"].update_one(
            {"_id": inst["_id"], "object_id": object_id},
            {"$set": {"tier": "hot", "hot_until": hold}, "$unset": {"archived_at": ""}},
        )
        await _audit_move(audit, inst, object_id, {"from": "archive", "to": "hot", "rule": "recall", "why": reason})
        report.instances += 1
    report.seconds = time.monotonic() - started
    return report


async def _with_site(job: Callable[[TierStore, TierStore, Any, AuditEmitter], Awaitable[_T]]) -> _T:
    """Runs ``job(hot, archive, index, audit)`` against the site the environment names."""
    from dicomsafe.storage.store_env import archive_from_env, store_from_env

    archive_settings: StoreSettings | None = archive_from_env()
    if archive_settings is None:
        raise PolicyError("CRYPTO_ARCHIVE_STORE_URL is not set: there is no archive tier")
    hot, archive = open_store(store_from_env()), open_store(archive_settings)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(env_secret("MONGODB_URI") or env_str("MONGODB_URI"))
    index = client[env_opt("GATEWAY_INDEX_DATABASE") or "dicomsafe_index"]
    producer = new_producer(env_str("KAFKA_BOOTSTRAP"), "dicomsafe-tiering")
    await producer.start()
    try:
        audit = AuditEmitter(producer, "tiering", Topics(env_opt("KAFKA_TOPIC_PREFIX")).audit)
        return await job(hot, archive, index, audit)
    finally:
        await producer.stop()
        await client.close()


async def provision(admin_uri: str, database: str, password: str | None = None) -> tuple[str, str]:
    """The job's database identity: find and update in the study index, nothing else (no
    insert, no delete, no other database). Returns (user, password)."""
    password = password or secrets.token_urlsafe(24)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(admin_uri, serverSelectionTimeoutMS=10000)
    try:
        await ensure_role_and_user(client, database, INDEX_ROLE, INDEX_USER, password, INDEX_ACTIONS)
    finally:
        await client.close()
    return INDEX_USER, password


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("run", help="move what the policy says is due to the archive tier")
    cmd.add_argument("--policy", type=Path, required=True)
    cmd.add_argument("--dry-run", action="store_true", help="count what is due, move nothing")
    back = sub.add_parser("recall", help="bring a study (or series) back to the hot tier ahead of its use")
    back.add_argument("--study", required=True, help="StudyInstanceUID")
    back.add_argument("--series", default="", help="only this SeriesInstanceUID")
    back.add_argument("--reason", required=True, help="why (recorded in the audit trail; no PHI)")
    back.add_argument("--keep-days", type=float, default=DEFAULT_KEEP_DAYS, help="held hot this long")
    prov = sub.add_parser("provision", help="create the job's index user (MONGODB_ADMIN_URI, an administrator)")
    prov.add_argument("--password-file", type=Path, required=True, help="read if present, else written")
    prov.add_argument("--database", default="dicomsafe_index")
    args = parser.parse_args(argv)
    try:
        if args.command == "provision":
            admin_uri = env_secret("MONGODB_ADMIN_URI")
            if not admin_uri:
                raise PolicyError("MONGODB_ADMIN_URI (or _FILE) is required")
            user = provision_with_password_file(args.password_file, lambda pw: provision(admin_uri, args.database, pw))
            print(f"tiering job's index user {user} ready")
            return 0
        if args.command == "recall":
            rr = asyncio.run(
                _with_site(
                    lambda hot, archive, index, audit: recall(
                        hot, archive, index, audit, args.study, args.reason, args.keep_days, args.series
                    )
                )
            )
            print(f"{rr.instances} instances recalled ({rr.copied} copied, {rr.bytes_copied} bytes), {rr.seconds:.1f}s")
            return 0
        policy = load_policy(args.policy)
        r = asyncio.run(
            _with_site(lambda hot, archive, index, audit: run(policy, hot, archive, index, audit, dry_run=args.dry_run))
        )
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
