"""What a storage commitment request asks and what its report says."""

from __future__ import annotations

from pydicom.dataset import Dataset

from services.gateway.storage_commitment import (
    ALL_COMMITTED,
    CLASS_INSTANCE_CONFLICT,
    NO_SUCH_INSTANCE,
    SOME_FAILED,
    Request,
    parse_request,
    report,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


def _request(*refs: tuple[str, str], transaction: str = "1.2.3.99") -> Dataset:
    ds = Dataset()
    if transaction:
        ds.TransactionUID = transaction
    ds.ReferencedSOPSequence = []
    for sop_class, sop in refs:
        item = Dataset()
        if sop_class:
            item.ReferencedSOPClassUID = sop_class
        if sop:
            item.ReferencedSOPInstanceUID = sop
        ds.ReferencedSOPSequence.append(item)
    return ds


def test_a_request_names_its_transaction_and_instances() -> None:
    assert parse_request(_request((CT, "1.1"), (MR, "1.2"))) == Request("1.2.3.99", ((CT, "1.1"), (MR, "1.2")))


def test_unusable_requests_are_refused() -> None:
    assert parse_request(None) is None
    assert parse_request(_request((CT, "1.1"), transaction="")) is None
    assert parse_request(_request()) is None
    assert parse_request(_request((CT, ""))) is None


def test_the_report_commits_what_is_stored_as_the_class_named() -> None:
    request = Request("9.9", ((CT, "1.1"), (CT, "1.2"), (MR, "1.3")))
    event_type, info = report(request, {"1.1": CT, "1.3": CT})
    assert event_type == SOME_FAILED and info.TransactionUID == "9.9"
    assert [i.ReferencedSOPInstanceUID for i in info.ReferencedSOPSequence] == ["1.1"]
    assert [(i.ReferencedSOPInstanceUID, i.FailureReason) for i in info.FailedSOPSequence] == [
        ("1.2", NO_SUCH_INSTANCE),
        ("1.3", CLASS_INSTANCE_CONFLICT),
    ]
    everything, info = report(Request("9.9", ((CT, "1.1"),)), {"1.1": CT})
    assert everything == ALL_COMMITTED and "FailedSOPSequence" not in info
