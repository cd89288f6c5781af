"""Announcing emergency overrides: "Started" when a break-glass grant is issued, "Stopped" when
it expires or is revoked — each as an audit event (DICOM 110113 Security Alert) and as a
security alert on ``security.alerts``.

"Stopped" must be said once per grant, also when the grant ran out while authz was down, so
it is driven by the grant store rather than a timer: a sweep (at start and every few seconds)
finds ended break-glass grants without the ``stop_announced_at`` marker, claims each for a
short lease (replicas sweeping at once do not both send it), publishes, then sets the marker.
Event and alert ids are derived from the grant id, so a crash between publishing and marking
repeats the same ids, which the audit store and alert consumers recognise as one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging

from pymongo.errors import PyMongoError

from dicomsafe.common.audit_emitter import stable_event_id
from dicomsafe.v1 import audit_pb2
from services.authz.grants import GrantStore, StoredGrant
from services.authz.trail import AuditUnavailable, Trail

log = logging.getLogger("dicomsafe.authz")

# DICOM PS3.16 CID 403 security alert types (the audit event itself is 110113 Security Alert).
STARTED_TYPE = "110127"  # Emergency Override Started
STOPPED_TYPE = "110138"  # Emergency Override Stopped
RULE_STARTED = "break_glass_started"
RULE_STOPPED = "break_glass_stopped"
_OVERRIDE = audit_pb2.AuditAction.AUDIT_ACTION_EMERGENCY_OVERRIDE
_SUCCESS = audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS


def started_event_id(grant_id: str) -> str:
    return stable_event_id("authz", RULE_STARTED, grant_id)


def stopped_event_id(grant_id: str) -> str:
    return stable_event_id("authz", RULE_STOPPED, grant_id)


def _details(grant: StoredGrant, phase: str, type_code: str) -> dict[str, str]:
    return {
        "grant_id": grant.grant_id,
        "override": phase,
        "event_type_code": type_code,
        "role": grant.role,
        "scope": grant.scope.kind,
        "not_before": grant.not_before.isoformat(),
        "not_after": grant.not_after.isoformat(),
        "break_glass": "true",
    }


class OverrideAnnouncer:
    def __init__(self, grants: GrantStore, trail: Trail, claim_lease: dt.timedelta = dt.timedelta(seconds=60)) -> None:
        self._grants = grants
        self._trail = trail
        self._lease = claim_lease

    async def started(self, grant: StoredGrant, actor_roles: tuple[str, ...]) -> None:
        """Record "Started" and raise its alert; only then does the grant confer anything.

        Raises ``AuditUnavailable`` (the grant stays unusable) if either is not acknowledged.
        """
        event_id = started_event_id(grant.grant_id)
        # The stated reason is free text from a clinician: kept in the audit trail, which is
        # made for it, and out of the alert, which may travel further (SIEM, pager).
        await self._trail.audit(
            _OVERRIDE,
            _SUCCESS,
            grant.subject,
            actor_roles=actor_roles,
            study_instance_uid=grant.study_instance_uid,
            patient_ref=grant.patient_ref,
            reason=f"emergency override started: {grant.reason}",
            details=_details(grant, "started", STARTED_TYPE),
            event_id=event_id,
        )
        minutes = round((grant.not_after - grant.not_before).total_seconds() / 60)
        await self._trail.alert(
            stable_event_id("authz", "alert", RULE_STARTED, grant.grant_id),
            RULE_STARTED,
            "critical",
            f"emergency override started by {grant.subject}: role {grant.role} on one {grant.scope.kind} "
            f"for {minutes} min (grant {grant.grant_id})",
            subjects=[grant.subject],
            patient_refs=[grant.patient_ref] if grant.patient_ref else [],
            evidence_event_ids=[event_id],
        )
        await self._grants.mark_started_announced(grant.grant_id, dt.datetime.now(dt.UTC))

    async def stopped(self, grant: StoredGrant, now: dt.datetime) -> bool:
        """Announce that ``grant`` ended, unless it already was (or another replica holds it)."""
        if not await self._grants.claim_stop(grant.grant_id, now, self._lease):
            return False
        how = "revoked" if grant.revoked_at is not None else "expired"
        event_id = stopped_event_id(grant.grant_id)
        await self._trail.audit(
            _OVERRIDE,
            _SUCCESS,
            grant.subject,
            actor_roles=(grant.role,),
            study_instance_uid=grant.study_instance_uid,
            patient_ref=grant.patient_ref,
            reason=f"emergency override stopped: {how}",
            details={**_details(grant, "stopped", STOPPED_TYPE), "ended": how},
            event_id=event_id,
        )
        await self._trail.alert(
            stable_event_id("authz", "alert", RULE_STOPPED, grant.grant_id),
            RULE_STOPPED,
            "warning",
            f"emergency override of {grant.subject} stopped ({how}); review its accesses (grant {grant.grant_id})",
            subjects=[grant.subject],
            patient_refs=[grant.patient_ref] if grant.patient_ref else [],
            evidence_event_ids=[started_event_id(grant.grant_id), event_id],
        )
        return await self._grants.mark_stop_announced(grant.grant_id, dt.datetime.now(dt.UTC))

    async def sweep(self) -> int:
        now = dt.datetime.now(dt.UTC)
        announced = 0
        for grant in await self._grants.unannounced_stops(now):
            announced += await self.stopped(grant, now)
        return announced

    async def keep(self, interval_s: float, stop: asyncio.Event) -> None:
        """Background task: sweep now (grants that ended while authz was down) and then periodically."""
        while not stop.is_set():
            if self._trail.connected:
                try:
                    if n := await self.sweep():
                        log.warning("emergency overrides stopped", extra={"count": n})
                except (AuditUnavailable, PyMongoError) as exc:
                    # The marker is unset, so the next sweep (here or on another replica) retries.
                    log.error("override stop not announced yet; retrying", extra={"error": type(exc).__name__})
                except Exception as exc:  # noqa: BLE001 - must not end the background task
                    # A malformed grant document must not stop the service; the type only, as a
                    # message could quote the document.
                    log.error("override sweep failed; retrying", extra={"error": type(exc).__name__})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_s)
