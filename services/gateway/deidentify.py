"""De-identified release for the researcher role: PS3.15 Annex E Basic Application Confidentiality Profile.

The attribute actions come from the Annex E table as shipped by the maintained `dicom-anonymizer`
package (its 2026c database). UIDs are replaced deterministically with a keyed hash (HMAC with a
gateway secret), not the package's process-local random map: the same study keeps the same
pseudonymous UIDs across requests and restarts, so a researcher can reassemble series, and nobody
without the key can map them back.

QIDO-RS results for de-identified callers go through the same treatment (`query_result`), so the
UIDs a researcher finds are the UIDs of the instances they then retrieve. Matching is allowed only
on attributes the profile keeps (and on the pseudonymous UIDs): matching on one it removes or
replaces would reveal its value by bisection (PatientBirthDate ranges, PatientName wildcards).
"""

from __future__ import annotations

import hashlib
import hmac
import io
from collections.abc import Callable
from typing import Any

import pydicom
from dicomanonymizer import simpledicomanonymizer
from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as annex_e
from dicomanonymizer.simpledicomanonymizer import anonymize_dataset, initialize_actions
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

ANNEX_E_VERSION = "dicomfields_2026c"
# PS3.15 E.1-1: "Patient Identity Removed" (0012,0062) YES and the method code for the basic profile.
BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")

TagAction = Callable[[Dataset, Any], None]
# Every attribute the profile acts on (removes, empties, replaces) and the UIDs it maps.
_TREATED = frozenset(annex_e.ALL_TAGS)
_MAPPED_UIDS = frozenset(annex_e.U_TAGS)
KEPT, PSEUDONYMOUS, WITHHELD = "kept", "pseudonymous", "withheld"


def matching_treatment(keyword: str) -> str:
    """How a de-identified query may match on an attribute: as is, by pseudonymous UID, or not at all."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        return WITHHELD  # not a standard attribute: nothing to say it is harmless
    pair = (tag >> 16, tag & 0xFFFF)
    if pair in _MAPPED_UIDS:
        return PSEUDONYMOUS
    return WITHHELD if pair in _TREATED else KEPT


class Deidentifier:
    def __init__(self, uid_key: bytes) -> None:
        if len(uid_key) < 16:
            raise ValueError("the de-identification UID key must be at least 16 bytes")
        self._key = uid_key
        rules: dict[Any, TagAction] = {}
        for tag in (*annex_e.U_TAGS, *annex_e.X_Z_U_STAR_TAGS):
            rules[tag] = self._replace_uids
        self._rules = rules

    @property
    def key_id(self) -> str:
        """Names the UID key without revealing it: stored pseudonyms made with another key are stale."""
        return hmac.new(self._key, b"dicomsafe pseudonymous UID key id", hashlib.sha256).hexdigest()[:16]

    def pseudonymous_uid(self, uid: str) -> str:
        """A valid UID under the 2.25 root (ITU-T X.667), derived from the original with the key."""
        digest = hmac.new(self._key, uid.encode("ascii", "replace"), hashlib.sha256).digest()[:16]
        return f"2.25.{int.from_bytes(digest, 'big')}"

    def dataset(self, ds: Dataset) -> Dataset:
        """De-identify in place (and return) a dataset, file meta included."""
        try:
            anonymize_dataset(
                ds,
                extra_anonymization_rules=self._rules,
                delete_private_tags=True,
                base_rules_gen=lambda: initialize_actions(ANNEX_E_VERSION),
            )
        finally:
            # The package remembers every UID it replaced (a process-wide map, for its own "D" rules on
            # UI elements): forgotten after each dataset, so a long-running gateway does not grow it.
            simpledicomanonymizer.dictionary.clear()
        if "SOPInstanceUID" in ds and hasattr(ds, "file_meta"):
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientIdentityRemoved = "YES"
        method = Dataset()
        method.CodeValue, method.CodingSchemeDesignator, method.CodeMeaning = BASIC_PROFILE_CODE
        ds.DeidentificationMethodCodeSequence = [method]
        return ds

    def query_result(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """A QIDO-RS result (DICOM JSON) through the same profile as a released instance."""
        ds = Dataset.from_json(attrs)
        self.dataset(ds)
        out: dict[str, Any] = ds.to_json_dict()
        return out

    def instance(self, data: bytes) -> bytes:
        """De-identify a Part 10 instance; the transfer syntax (and so the pixel data) is unchanged."""
        ds = pydicom.dcmread(io.BytesIO(data))
        self.dataset(ds)
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        return out.getvalue()

    def _replace_uids(self, dataset: Dataset, tag: Any) -> None:
        element = dataset.get(tag)
        if element is None:
            return
        if element.VR == "SQ":
            for item in element.value:
                for nested in item.iterall():
                    if nested.VR == "UI" and nested.value:
                        nested.value = self._mapped(nested.value)
            return
        if element.value:
            element.value = self._mapped(element.value)

    def _mapped(self, value: Any) -> Any:
        if isinstance(value, MultiValue | list):
            return [self.pseudonymous_uid(str(v)) for v in value]
        return self.pseudonymous_uid(str(value))
