"""Exports: FHIR validated by two maintained libraries — fhirclient's models generated from FHIR
R4 (4.0.1) itself, strict, and fhir.resources' R4B model; DICOM XML checked against the
PS3.15 A.5.1 structure."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from fhir.resources.R4B.auditevent import AuditEvent as FhirAuditEvent
from fhirclient.models.auditevent import AuditEvent as R4AuditEvent
from fhirclient.models.fhirabstractbase import FHIRValidationError

from dicomsafe.v1 import audit_pb2
from services.audit.exports import EVENTS, NotExportable, to_dicom_xml, to_fhir

A, Out = audit_pb2.AuditAction, audit_pb2.AuditOutcome
# R4B changed nothing in AuditEvent from R4, so the R4B model validates R4 AuditEvents.
ALL_ACTIONS = [v for v in A.values() if v != A.AUDIT_ACTION_UNSPECIFIED]


def _record(action: int, outcome: int = Out.AUDIT_OUTCOME_SUCCESS, **fields: str) -> audit_pb2.AuditRecord:
    event = audit_pb2.AuditEvent(
        event_id="3f2b8c1e-0000-4000-8000-000000000001",
        service="gateway",
        action=action,  # type: ignore[arg-type]
        outcome=outcome,  # type: ignore[arg-type]
        actor="dr.house",
        actor_roles=["radiologist"],
        study_instance_uid=fields.get("study", "1.2.826.0.1.3680043.8.498.7"),
        patient_ref=fields.get("patient", "ab" * 16),
        reason=fields.get("reason", ""),
        details={"purpose": "treatment"},
    )
    event.occurred_at.FromSeconds(1_795_000_000)
    return audit_pb2.AuditRecord(chain="audit.events:0", seq=1, event=event)


def test_every_action_has_a_dicom_event_in_the_audit_range() -> None:
    assert set(EVENTS) == set(ALL_ACTIONS)
    for event in EVENTS.values():
        assert 110100 <= int(event.code) <= 110114
        assert event.action in {"C", "R", "U", "D", "E"}


@pytest.mark.parametrize("action", ALL_ACTIONS, ids=lambda a: A.Name(a))
@pytest.mark.parametrize("outcome", [Out.AUDIT_OUTCOME_SUCCESS, Out.AUDIT_OUTCOME_DENIED, Out.AUDIT_OUTCOME_FAILURE])
def test_fhir_audit_event_validates(action: int, outcome: int) -> None:
    resource = to_fhir(
        _record(action, outcome, reason="no role grants it" if outcome != Out.AUDIT_OUTCOME_SUCCESS else "")
    )
    # R4 itself: strict models refuse unknown elements, wrong types and missing required ones,
    # and what they parsed serialises back to exactly what we exported.
    assert R4AuditEvent(resource, strict=True).as_json() == resource
    # Validation by the library; assertions on what it parsed back.
    parsed = FhirAuditEvent.model_validate(resource).model_dump(mode="json", exclude_none=True)
    expected_outcome = {Out.AUDIT_OUTCOME_SUCCESS: "0", Out.AUDIT_OUTCOME_DENIED: "4", Out.AUDIT_OUTCOME_FAILURE: "8"}
    assert parsed["type"]["code"] == EVENTS[action].code
    assert parsed["outcome"] == expected_outcome[outcome]  # type: ignore[index]
    assert parsed["agent"][0]["requestor"] is True
    assert parsed["purposeOfEvent"][0]["coding"][0]["code"] == "TREAT"
    assert {e["what"]["identifier"]["value"] for e in parsed["entity"]} == {
        "urn:oid:1.2.826.0.1.3680043.8.498.7",
        "ab" * 16,
    }


@pytest.mark.parametrize("action", ALL_ACTIONS, ids=lambda a: A.Name(a))
def test_dicom_audit_message_follows_ps3_15_a_5_1(action: int) -> None:
    root = ET.fromstring(to_dicom_xml(_record(action, Out.AUDIT_OUTCOME_DENIED, reason="refused")))
    assert root.tag == "AuditMessage"
    # Element order fixed by the schema: EventIdentification, ActiveParticipant+,
    # AuditSourceIdentification, ParticipantObjectIdentification*.
    tags = [child.tag for child in root]
    assert tags[0] == "EventIdentification"
    assert tags[1] == "ActiveParticipant"
    assert tags[2] == "AuditSourceIdentification"
    assert set(tags[3:]) <= {"ParticipantObjectIdentification"}
    ident = root.find("EventIdentification")
    assert ident is not None
    assert [child.tag for child in ident] == ["EventID", "EventOutcomeDescription", "PurposeOfUse"]
    assert ident.get("EventActionCode") == EVENTS[action].action
    assert ident.get("EventOutcomeIndicator") == "4"
    assert ident.get("EventDateTime", "").startswith("2026-")
    event_id = ident.find("EventID")
    assert event_id is not None and event_id.get("csd-code") == EVENTS[action].code
    assert event_id.get("codeSystemName") == "DCM" and event_id.get("originalText")
    user = root.find("ActiveParticipant")
    assert user is not None and user.get("UserID") == "dr.house" and user.get("UserIsRequestor") == "true"
    source = root.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditSourceID") == "dicomsafe-gateway"
    objects = {o.get("ParticipantObjectTypeCode"): o for o in root.findall("ParticipantObjectIdentification")}
    assert objects["2"].get("ParticipantObjectID") == "1.2.826.0.1.3680043.8.498.7"
    assert objects["2"].find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"  # type: ignore[union-attr]
    assert objects["1"].get("ParticipantObjectTypeCodeRole") == "1"


def test_unknown_action_is_not_silently_mislabelled() -> None:
    with pytest.raises(NotExportable):
        to_fhir(_record(999))


def test_the_r4_validator_refuses_what_r4_forbids() -> None:
    """The R4 check has teeth: a made-up element, a missing required one, a wrong type."""
    good = to_fhir(_record(A.AUDIT_ACTION_INSTANCE_RETRIEVED))
    missing = {k: v for k, v in good.items() if k != "recorded"}
    for bad in ({**good, "severity": "high"}, missing, {**good, "outcome": 8}):
        with pytest.raises(FHIRValidationError):
            R4AuditEvent(bad, strict=True)
