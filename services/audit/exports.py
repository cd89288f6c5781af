"""Audit records in the two standard shapes hospitals' audit repositories ingest:
DICOM PS3.15 A.5 audit messages (XML) and FHIR R4 AuditEvent (JSON).

Our actions map onto the DICOM audit event IDs 110100-110114; PS3.15 A.5 and FHIR use the
same code system ("DCM"), so one table serves both.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

from dicomsafe.v1 import audit_pb2

A = audit_pb2.AuditAction
Out = audit_pb2.AuditOutcome


@dataclass(frozen=True)
class DicomEvent:
    code: str
    meaning: str
    action: str  # EventActionCode: C(reate) R(ead) U(pdate) D(elete) E(xecute)


# Every action the pipeline emits → DICOM audit event (PS3.15 A.5.3, CID 400).
EVENTS: dict[int, DicomEvent] = {
    A.AUDIT_ACTION_INSTANCE_RECEIVED: DicomEvent("110107", "Import", "C"),
    A.AUDIT_ACTION_INSTANCE_REJECTED: DicomEvent("110107", "Import", "C"),
    A.AUDIT_ACTION_INSTANCE_STORED: DicomEvent("110107", "Import", "C"),
    A.AUDIT_ACTION_OBJECT_SEALED: DicomEvent("110103", "DICOM Instances Accessed", "C"),
    A.AUDIT_ACTION_OBJECT_OPENED: DicomEvent("110103", "DICOM Instances Accessed", "R"),
    A.AUDIT_ACTION_KEY_ROTATED: DicomEvent("110113", "Security Alert", "E"),
    A.AUDIT_ACTION_OBJECT_REWRAPPED: DicomEvent("110103", "DICOM Instances Accessed", "U"),
    # Moved between storage tiers, sealed: where the instance is kept changed, not what it is.
    A.AUDIT_ACTION_OBJECT_TIERED: DicomEvent("110103", "DICOM Instances Accessed", "U"),
    A.AUDIT_ACTION_PATIENT_ERASED: DicomEvent("110105", "DICOM Study Deleted", "D"),
    A.AUDIT_ACTION_PATIENT_ERASURE_REQUESTED: DicomEvent("110105", "DICOM Study Deleted", "D"),
    A.AUDIT_ACTION_ACCESS_DECISION: DicomEvent("110113", "Security Alert", "E"),
    A.AUDIT_ACTION_GRANT_CHANGED: DicomEvent("110113", "Security Alert", "U"),
    A.AUDIT_ACTION_EMERGENCY_OVERRIDE: DicomEvent("110113", "Security Alert", "E"),
    A.AUDIT_ACTION_POLICY_CHANGED: DicomEvent("110113", "Security Alert", "U"),
    A.AUDIT_ACTION_INSTANCE_RETRIEVED: DicomEvent("110104", "DICOM Instances Transferred", "R"),
    A.AUDIT_ACTION_STUDY_QUERIED: DicomEvent("110112", "Query", "E"),
    A.AUDIT_ACTION_AUDIT_QUERIED: DicomEvent("110101", "Audit Log Used", "R"),
    # PS3.15 A.5.3.10 records node authentication, accepted or refused, as a Security Alert.
    A.AUDIT_ACTION_PEER_ASSOCIATION: DicomEvent("110113", "Security Alert", "E"),
}
# EventOutcomeIndicator: 0 success, 4 minor failure (a refusal), 8 serious failure.
OUTCOMES = {Out.AUDIT_OUTCOME_SUCCESS: "0", Out.AUDIT_OUTCOME_DENIED: "4", Out.AUDIT_OUTCOME_FAILURE: "8"}
# Purpose of use → HL7 v3 ActReason.
PURPOSES = {"treatment": "TREAT", "research": "HRESCH", "erasure": "HDIRECT", "emergency": "ETREAT"}
DCM = "http://dicom.nema.org/resources/ontology/DCM"
PSEUDONYM_SYSTEM = "urn:dicomsafe:patient-pseudonym"


class NotExportable(ValueError):
    """A record whose action has no standard mapping (a newer producer than this exporter)."""


def _event(record: audit_pb2.AuditRecord) -> DicomEvent:
    try:
        return EVENTS[record.event.action]
    except KeyError:
        raise NotExportable(f"no DICOM event for action {record.event.action}") from None


def _timestamp(record: audit_pb2.AuditRecord) -> str:
    ts = record.event.occurred_at if record.event.HasField("occurred_at") else record.recorded_at
    return ts.ToJsonString()


def to_dicom_xml(record: audit_pb2.AuditRecord) -> str:
    """One PS3.15 A.5.1 AuditMessage."""
    e, event = record.event, _event(record)
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(
        root,
        "EventIdentification",
        EventActionCode=event.action,
        EventDateTime=_timestamp(record),
        EventOutcomeIndicator=OUTCOMES.get(e.outcome, "8"),
    )
    ET.SubElement(ident, "EventID", {"csd-code": event.code, "codeSystemName": "DCM", "originalText": event.meaning})
    # The schema's order: EventID, EventTypeCode*, EventOutcomeDescription?, PurposeOfUse*.
    if e.reason:
        ET.SubElement(ident, "EventOutcomeDescription").text = e.reason
    purpose = PURPOSES.get(e.details.get("purpose", ""))
    if purpose:
        ET.SubElement(
            ident, "PurposeOfUse", {"csd-code": purpose, "codeSystemName": "ActReason", "originalText": purpose}
        )
    user = ET.SubElement(root, "ActiveParticipant", UserID=e.actor or "unknown", UserIsRequestor="true")
    for role in e.actor_roles:
        ET.SubElement(user, "RoleIDCode", {"csd-code": role, "codeSystemName": "dicomsafe-roles", "originalText": role})
    source = ET.SubElement(root, "AuditSourceIdentification", AuditSourceID=f"dicomsafe-{e.service}")
    ET.SubElement(
        source, "AuditSourceTypeCode", {"csd-code": "4", "codeSystemName": "DCM", "originalText": "Application Server"}
    )
    if e.study_instance_uid:
        study = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            ParticipantObjectID=e.study_instance_uid,
            ParticipantObjectTypeCode="2",
            ParticipantObjectTypeCodeRole="3",
        )
        ET.SubElement(
            study,
            "ParticipantObjectIDTypeCode",
            {"csd-code": "110180", "codeSystemName": "DCM", "originalText": "Study Instance UID"},
        )
    if e.patient_ref:
        patient = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            ParticipantObjectID=e.patient_ref,
            ParticipantObjectTypeCode="1",
            ParticipantObjectTypeCodeRole="1",
        )
        ET.SubElement(
            patient,
            "ParticipantObjectIDTypeCode",
            {"csd-code": "2", "codeSystemName": "RFC-3881", "originalText": "Patient Number"},
        )
    return ET.tostring(root, encoding="unicode")


def to_fhir(record: audit_pb2.AuditRecord) -> dict[str, Any]:
    """One FHIR R4 AuditEvent resource."""
    e, event = record.event, _event(record)
    resource: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": e.event_id,
        "type": {"system": DCM, "code": event.code, "display": event.meaning},
        "action": event.action,
        "recorded": _timestamp(record),
        "outcome": OUTCOMES.get(e.outcome, "8"),
        "agent": [
            {
                "who": {"identifier": {"value": e.actor or "unknown"}},
                "requestor": True,
                **({"role": [{"text": role} for role in e.actor_roles]} if e.actor_roles else {}),
            }
        ],
        "source": {
            "observer": {"display": f"dicomsafe-{e.service}"},
            "type": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                    "code": "4",
                    "display": "Application Server",
                }
            ],
        },
    }
    if e.reason:
        resource["outcomeDesc"] = e.reason
    purpose = PURPOSES.get(e.details.get("purpose", ""))
    if purpose:
        resource["purposeOfEvent"] = [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": purpose}]}
        ]
    entities = []
    if e.study_instance_uid:
        entities.append(
            {
                "what": {"identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{e.study_instance_uid}"}},
                "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2"},
                "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "3"},
            }
        )
    if e.patient_ref:
        entities.append(
            {
                "what": {"identifier": {"system": PSEUDONYM_SYSTEM, "value": e.patient_ref}},
                "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1"},
                "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1"},
            }
        )
    if entities:
        resource["entity"] = entities
    return resource
