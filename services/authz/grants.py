"""Time-limited grants in MongoDB (authz's own database).

Read on every check and never cached, so an expiry or a revocation takes effect on the very
next decision, on every replica.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

from pymongo import ASCENDING, AsyncMongoClient
from pymongo.write_concern import WriteConcern

COLLECTION = "grants"


@dataclass(frozen=True)
class StoredGrant:
    grant_id: str
    subject: str
    role: str
    study_instance_uid: str
    not_before: dt.datetime
    not_after: dt.datetime
    break_glass: bool
    reason: str
    created_by: str
    revoked_at: dt.datetime | None = None


def _utc(value: dt.datetime) -> dt.datetime:
    # BSON dates come back naive (UTC).
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _from_doc(doc: dict[str, Any]) -> StoredGrant:
    return StoredGrant(
        grant_id=doc["grant_id"],
        subject=doc["subject"],
        role=doc["role"],
        study_instance_uid=doc.get("study_instance_uid", ""),
        not_before=_utc(doc["not_before"]),
        not_after=_utc(doc["not_after"]),
        break_glass=bool(doc.get("break_glass")),
        reason=doc.get("reason", ""),
        created_by=doc.get("created_by", ""),
        revoked_at=_utc(doc["revoked_at"]) if doc.get("revoked_at") else None,
    )


class GrantStore:
    def __init__(self, client: AsyncMongoClient[dict[str, Any]], database: str) -> None:
        self._grants = client[database].get_collection(COLLECTION, write_concern=WriteConcern(w="majority", j=True))

    async def ensure_indexes(self) -> None:
        await self._grants.create_index("grant_id", unique=True, name="grant_id")
        await self._grants.create_index([("subject", ASCENDING), ("not_after", ASCENDING)], name="subject_expiry")

    async def create(
        self,
        subject: str,
        role: str,
        study: str,
        not_before: dt.datetime,
        not_after: dt.datetime,
        reason: str,
        created_by: str,
        break_glass: bool = False,
    ) -> StoredGrant:
        grant = StoredGrant(
            str(uuid.uuid4()), subject, role, study, not_before, not_after, break_glass, reason, created_by
        )
        await self._grants.insert_one({**grant.__dict__, "created_at": dt.datetime.now(dt.UTC)})
        return grant

    async def revoke(self, grant_id: str, now: dt.datetime) -> StoredGrant | None:
        doc = await self._grants.find_one_and_update(
            {"grant_id": grant_id, "revoked_at": None}, {"$set": {"revoked_at": now}}, return_document=True
        )
        return _from_doc(doc) if doc else None

    async def active(self, subject: str, study: str, now: dt.datetime) -> list[StoredGrant]:
        """Grants in force now for this subject, scoped to every resource or to this study."""
        scopes = ["", study] if study else [""]
        cursor = self._grants.find(
            {
                "subject": subject,
                "revoked_at": None,
                "not_before": {"$lte": now},
                "not_after": {"$gt": now},
                "study_instance_uid": {"$in": scopes},
            }
        )
        return [_from_doc(doc) async for doc in cursor]
