"""Time-limited grants in MongoDB (authz's own database).

Every change (a grant created or revoked, an override announced) also increments one
generation counter (``GENERATION``), which ``grant_cache.GrantCache`` polls: checks are answered
from a cache that a change empties on every replica within the poll interval.

Window, holder and scope are judged by ``policy.decide``; the store only narrows the read to the
grants that have not ended of the subject itself and of the roles it holds (a grant names either
one ``subject`` or a ``grantee_role``: every holder of that role). Each half of the read has its
own index (``subject_expiry``, ``grantee_role_expiry``), so a check never scans the collection.

Break-glass grants also carry the durable markers of their announcements: ``started_announced_at``
(set once the "Emergency Override Started" audit event and alert were acknowledged; until then
the grant confers nothing) and ``stop_announced_at`` (set once "Stopped" was, so it is
announced once, also after a restart).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from pymongo import ASCENDING, AsyncMongoClient
from pymongo.write_concern import WriteConcern

from services.authz.policy import RoleGrant, Scope

COLLECTION = "grants"
# One document: {_id: "grants", n: <changes so far>}.
GENERATION = "grants_generation"


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
    site: str = ""
    department: str = ""
    patient_ref: str = ""
    started_announced_at: dt.datetime | None = None
    stop_announced_at: dt.datetime | None = None
    # Set instead of ``subject`` on a grant to every holder of this role.
    grantee_role: str = ""

    @property
    def scope(self) -> Scope:
        return Scope(self.site, self.department, self.patient_ref, self.study_instance_uid)

    @property
    def usable(self) -> bool:
        # An emergency override nobody has been told about must not open anything.
        return not self.break_glass or self.started_announced_at is not None

    def as_role_grant(self) -> RoleGrant:
        return RoleGrant(
            self.role, self.scope, self.not_before, self.not_after, self.break_glass, holder_role=self.grantee_role
        )

    def ended(self, now: dt.datetime) -> bool:
        return self.revoked_at is not None or self.not_after <= now


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    # BSON dates come back naive (UTC).
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _from_doc(doc: dict[str, Any]) -> StoredGrant:
    return StoredGrant(
        grant_id=doc["grant_id"],
        subject=doc.get("subject", ""),
        role=doc["role"],
        study_instance_uid=doc.get("study_instance_uid", ""),
        not_before=_utc(doc["not_before"]) or dt.datetime.min.replace(tzinfo=dt.UTC),
        not_after=_utc(doc["not_after"]) or dt.datetime.min.replace(tzinfo=dt.UTC),
        break_glass=bool(doc.get("break_glass")),
        reason=doc.get("reason", ""),
        created_by=doc.get("created_by", ""),
        revoked_at=_utc(doc.get("revoked_at")),
        site=doc.get("site", ""),
        department=doc.get("department", ""),
        patient_ref=doc.get("patient_ref", ""),
        started_announced_at=_utc(doc.get("started_announced_at")),
        stop_announced_at=_utc(doc.get("stop_announced_at")),
        grantee_role=doc.get("grantee_role", ""),
    )


class GrantStore:
    def __init__(self, client: AsyncMongoClient[dict[str, Any]], database: str) -> None:
        durable = WriteConcern(w="majority", j=True)
        self._grants = client[database].get_collection(COLLECTION, write_concern=durable)
        self._generation = client[database].get_collection(GENERATION, write_concern=durable)
        # Called after each change this process made (its cache empties at once, not a poll later).
        self.on_change: list[Callable[[], None]] = []

    async def generation(self) -> int:
        """How many changes the grants have seen: unchanged means every cached read is current."""
        doc = await self._generation.find_one({"_id": COLLECTION})
        return int(doc["n"]) if doc else 0

    async def _changed(self) -> None:
        # After the change itself: a replica that reads the new generation reads the change too.
        for callback in self.on_change:
            callback()  # first: even if the counter's write fails, this replica is current
        await self._generation.update_one({"_id": COLLECTION}, {"$inc": {"n": 1}}, upsert=True)

    async def ensure_indexes(self) -> None:
        await self._grants.create_index("grant_id", unique=True, name="grant_id")
        await self._grants.create_index([("subject", ASCENDING), ("not_after", ASCENDING)], name="subject_expiry")
        await self._grants.create_index(
            [("grantee_role", ASCENDING), ("not_after", ASCENDING)], name="grantee_role_expiry"
        )
        await self._grants.create_index(
            [("break_glass", ASCENDING), ("stop_announced_at", ASCENDING)], name="break_glass_open"
        )

    async def create(
        self,
        subject: str,
        role: str,
        scope: Scope,
        not_before: dt.datetime,
        not_after: dt.datetime,
        reason: str,
        created_by: str,
        break_glass: bool = False,
        grantee_role: str = "",
    ) -> StoredGrant:
        """A grant to ``subject``, or (``subject`` empty) to every holder of ``grantee_role``."""
        grant = StoredGrant(
            grant_id=str(uuid.uuid4()),
            subject=subject,
            role=role,
            study_instance_uid=scope.study_instance_uid,
            not_before=not_before,
            not_after=not_after,
            break_glass=break_glass,
            reason=reason,
            created_by=created_by,
            site=scope.site,
            department=scope.department,
            patient_ref=scope.patient_ref,
            grantee_role=grantee_role,
        )
        await self._grants.insert_one({**asdict(grant), "created_at": dt.datetime.now(dt.UTC)})
        await self._changed()
        return grant

    async def revoke(self, grant_id: str, now: dt.datetime) -> StoredGrant | None:
        doc = await self._grants.find_one_and_update(
            {"grant_id": grant_id, "revoked_at": None}, {"$set": {"revoked_at": now}}, return_document=True
        )
        if doc is None:
            return None
        await self._changed()
        return _from_doc(doc)

    async def active(self, subject: str, now: dt.datetime, roles: frozenset[str] = frozenset()) -> list[StoredGrant]:
        """The grants that have not ended (any scope, including not yet started) of the subject
        and, with ``roles``, of the holders of those roles."""
        live = {"revoked_at": None, "not_after": {"$gt": now}}
        who: list[dict[str, Any]] = [{"subject": subject}]
        if roles:
            who.append({"grantee_role": {"$in": sorted(roles)}})
        # One clause per index; the server answers an $or clause by clause, each from its index.
        query = {**live, "$or": who} if len(who) > 1 else {**live, **who[0]}
        return [_from_doc(doc) async for doc in self._grants.find(query)]

    async def mark_started_announced(self, grant_id: str, now: dt.datetime) -> None:
        await self._grants.update_one({"grant_id": grant_id}, {"$set": {"started_announced_at": now}})
        await self._changed()  # the override now confers its role

    async def unannounced_stops(self, now: dt.datetime) -> list[StoredGrant]:
        """Break-glass grants that ended (expired or revoked) without their "Stopped" announcement."""
        cursor = self._grants.find({"break_glass": True, "stop_announced_at": None})
        open_grants = [_from_doc(doc) async for doc in cursor]
        return [g for g in open_grants if g.ended(now)]

    async def claim_stop(self, grant_id: str, now: dt.datetime, lease: dt.timedelta) -> bool:
        """Take the announcement of one Stopped for ``lease``, so replicas sweeping at the same time
        do not both send it; a replica that dies holding the claim leaves it to expire."""
        doc = await self._grants.find_one_and_update(
            {
                "grant_id": grant_id,
                "stop_announced_at": None,
                "$or": [{"stop_claimed_until": None}, {"stop_claimed_until": {"$lte": now}}],
            },
            {"$set": {"stop_claimed_until": now + lease}},
        )
        return doc is not None

    async def mark_stop_announced(self, grant_id: str, now: dt.datetime) -> bool:
        """Set the marker once; False if another replica (or an earlier run) already did."""
        result = await self._grants.update_one(
            {"grant_id": grant_id, "stop_announced_at": None}, {"$set": {"stop_announced_at": now}}
        )
        return result.modified_count == 1
