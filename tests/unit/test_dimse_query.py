"""How a C-FIND identifier becomes an index query, and a match the answer the peer asked for."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from services.gateway.dimse_qr import _answer, _patients, parse_query
from services.gateway.study_index import Found, QueryError


def _identifier(level: str, **keys: object) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def test_matching_values_become_parameters_and_every_key_is_returned() -> None:
    query = parse_query(
        _identifier(
            "SERIES",
            PatientID="P1",
            StudyInstanceUID=["1.2.3", "1.2.4"],
            Modality="",
            PatientSex="F",  # the index does not match on it: a return key only (PS3.4 C.2.2.2.2)
            StudyDate="20260101-20261231",
        )
    )
    assert query.level == "SERIES"
    assert query.params == {"PatientID": "P1", "StudyInstanceUID": "1.2.3\\1.2.4", "StudyDate": "20260101-20261231"}
    assert [k.keyword for k in query.keys] == ["StudyDate", "Modality", "PatientID", "PatientSex", "StudyInstanceUID"]


def test_instance_keys_only_match_at_image_level() -> None:
    assert parse_query(_identifier("STUDY", SOPInstanceUID="1.2.9")).params == {}
    assert parse_query(_identifier("IMAGE", SOPInstanceUID="1.2.9")).params == {"SOPInstanceUID": "1.2.9"}


@pytest.mark.parametrize("level", ["", "WARD", "FRAME"])
def test_an_unknown_level_is_refused(level: str) -> None:
    with pytest.raises(QueryError, match="QueryRetrieveLevel"):
        parse_query(_identifier(level))


def test_an_answer_carries_the_requested_keys_and_nothing_else() -> None:
    query = parse_query(_identifier("STUDY", PatientName="", StudyInstanceUID="", AccessionNumber=""))
    attrs = {
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "DOE^JANE"}]},
        "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
        "00100020": {"vr": "LO", "Value": ["P1"]},  # in the index, not asked for
    }
    answer = _answer(query, attrs, "DICOMSAFE_QR")
    assert str(answer.PatientName) == "DOE^JANE" and answer.StudyInstanceUID == "1.2.3"
    assert "AccessionNumber" in answer and not answer.AccessionNumber
    assert "PatientID" not in answer
    assert (answer.QueryRetrieveLevel, answer.RetrieveAETitle) == ("STUDY", "DICOMSAFE_QR")
    assert answer.SpecificCharacterSet == "ISO_IR 192"


def _found(study: str, pid: str) -> Found:
    attrs = {"00100020": {"vr": "LO", "Value": [pid]}, "00100010": {"vr": "PN", "Value": [{"Alphabetic": pid}]}}
    return Found(attrs=attrs, study_uid=study, labels=(), department="", site="", patient_ref="")


def test_patient_level_answers_once_per_patient_with_their_visible_studies() -> None:
    patients = _patients([_found("1.1", "P2"), _found("1.2", "P1"), _found("1.3", "P2")])
    assert [(p["00100020"]["Value"][0], p["00201200"]["Value"][0]) for p in patients] == [("P1", 1), ("P2", 2)]
