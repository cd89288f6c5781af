"""What the QIDO index keeps of an instance: the standard matching and return keys, nothing more.

Data minimisation: only the attributes QIDO-RS queries match on or return (PS3.18 table 10.6.1-x
"required matching/return keys") plus the layout WADO-RS needs. Everything else stays inside the
sealed object and is read back through crypto when a user is allowed to see it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from services.gateway.instance_layout import InstanceLayout

STUDY_KEYS = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDescription",
)
SERIES_KEYS = ("Modality", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription")
INSTANCE_KEYS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
)
# (0040,3001) Confidentiality Constraint on Patient Data Description: how a sending system flags
# a study as sensitive. Known words map to policy labels; any other constraint means "restricted".
CONFIDENTIALITY_WORDS = {"vip": "vip", "mental": "mental_health", "psych": "mental_health"}


@dataclass(frozen=True)
class IndexEntry:
    object_id: str
    study: dict[str, Any]
    series: dict[str, Any]
    instance: dict[str, Any]
    labels: tuple[str, ...]
    department: str
    site: str
    patient_ref: str
    transfer_syntax_uid: str
    size: int
    layout: InstanceLayout
    # When the object was sealed (at the latest): an erasure removes what was stored before it,
    # never what a returning patient stores afterwards under a fresh erasure key.
    stored_at: dt.datetime | None = None

    @property
    def study_uid(self) -> str:
        return str(self.study["match"]["StudyInstanceUID"])

    @property
    def series_uid(self) -> str:
        return str(self.series["match"]["SeriesInstanceUID"])

    @property
    def sop_uid(self) -> str:
        return str(self.instance["match"]["SOPInstanceUID"])


def entry_for(
    ds: Dataset,
    layout: InstanceLayout,
    object_id: str,
    size: int,
    patient_ref: str = "",
    stored_at: dt.datetime | None = None,
) -> IndexEntry:
    return IndexEntry(
        object_id=object_id,
        study=_level(ds, STUDY_KEYS),
        series=_level(ds, SERIES_KEYS),
        instance=_level(ds, INSTANCE_KEYS),
        labels=sensitivity_labels(ds),
        department=str(ds.get("InstitutionalDepartmentName", "") or ""),
        # The institution is the site of site-scoped roles and grants.
        site=str(ds.get("InstitutionName", "") or ""),
        patient_ref=patient_ref,
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        size=size,
        layout=layout,
        stored_at=stored_at,
    )


def sensitivity_labels(ds: Dataset) -> tuple[str, ...]:
    constraint = str(ds.get("ConfidentialityConstraintOnPatientDataDescription", "") or "").strip().lower()
    if not constraint:
        return ()
    labels = {label for word, label in CONFIDENTIALITY_WORDS.items() if word in constraint}
    return tuple(sorted(labels or {"restricted"}))


def _level(ds: Dataset, keys: tuple[str, ...]) -> dict[str, Any]:
    """DICOM JSON of the level's attributes (what QIDO returns) and plain strings to match on."""
    subset = Dataset()
    match: dict[str, str] = {}
    for keyword in keys:
        element = ds.data_element(keyword) if keyword in ds else None
        if element is None:
            continue
        subset.add(element)
        value = element.value
        match[keyword] = "" if value is None else str(value)
    return {"json": subset.to_json_dict(), "match": match}
