"""ingest's DIMSE listener against real peers: pynetdicom and DCMTK (storescu, echoscu) over
mutual TLS 1.3, with the whole stack behind it.

- a configured modality's C-STOREs are sealed, indexed, retrievable through DICOMweb
  with the same pixel data and audited under the modality's name; its association is audited;
- an unknown AE title is rejected at association, a certificate from another CA fails the
  handshake, a peer granted only C-ECHO is refused C-STORE: each of them audited;
- a malformed data set is refused with a failure status and an Error Comment, and the
  association goes on to store the next instance;
- a SOP class the storage AE does not serve is rejected at negotiation, and a peer's abort
  loses none of the instances it had been told were stored.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from tests.dimse_peer import associate, audit_records
from tests.own_site import wado_uri
from tools import dicom_samples
from tools.debian_packages import PackageMissing, ensure_binaries
from tools.oidc_issuer import LocalIssuer
from tools.stack import DIMSE_AE_TITLE, Stack

pytestmark = pytest.mark.e2e

CT_PEER = "modality-ct1"
ECHO_PEER = "modality-echo"
DIMSE_PEERS = [
    {
        "name": CT_PEER,
        "ae_title": "CT1",
        "certificate": CT_PEER,
        "addresses": ["127.0.0.1/32"],
        "services": ["echo", "store"],
    },
    {
        "name": ECHO_PEER,
        "ae_title": "ECHO1",
        "certificate": ECHO_PEER,
        "addresses": ["127.0.0.1/32"],
        "services": ["echo"],
    },
]


def _associate(stack: Stack, calling: str, identity: str, cert_dir: Path | None = None) -> Association:
    contexts = [build_context(Verification), build_context(CTImageStorage, ExplicitVRLittleEndian)]
    return associate(stack, stack.settings.dimse_port, DIMSE_AE_TITLE, calling, identity, contexts, cert_dir=cert_dir)


def _ct(marker: str, seed: int, study: str) -> pydicom.Dataset:
    ds = dicom_samples.ct_image(study_uid=study, seed=seed, rows=128, columns=128)
    ds.PatientName = marker
    return ds


def _audit(stack: Stack, query: dict[str, Any], at_least: int) -> list[dict[str, Any]]:
    return asyncio.run(audit_records(stack, query, at_least))


def test_modality_stores_over_tls_and_reads_back(stack: Stack, idp: LocalIssuer) -> None:
    study = pydicom.uid.generate_uid()
    sent = [_ct("DIMSE^STORE", i, study) for i in range(3)]
    assoc = _associate(stack, "CT1", CT_PEER)
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        for ds in sent:
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()

    asyncio.run(stack.wait_indexed({study}))
    reader = idp.token("dr.house")
    for ds in sent:
        original = dicom_samples.to_bytes(ds)
        got = wado_uri(stack.settings, reader, original)
        assert got.status_code == 200
        back = pydicom.dcmread(pydicom.filebase.DicomBytesIO(got.content))
        assert back.SOPInstanceUID == ds.SOPInstanceUID
        assert back.PixelData == ds.PixelData

    sops = [str(ds.SOPInstanceUID) for ds in sent]
    stored = _audit(stack, {"event.action": "AUDIT_ACTION_INSTANCE_STORED", "event.sop_instance_uid": {"$in": sops}}, 3)
    assert {r["event"]["actor"] for r in stored} == {f"dimse:{CT_PEER}"}
    accepted = _audit(stack, {"event.action": "AUDIT_ACTION_PEER_ASSOCIATION", "event.actor": f"dimse:{CT_PEER}"}, 1)
    assert accepted and accepted[0]["event"]["outcome"] == "AUDIT_OUTCOME_SUCCESS"
    assert accepted[0]["event"]["details"]["tls_version"] == "TLSv1.3"


def test_unknown_ae_title_is_rejected_and_audited(stack: Stack) -> None:
    assoc = _associate(stack, "INTRUDER", CT_PEER)
    assert assoc.is_rejected and not assoc.is_established
    refused = _audit(
        stack, {"event.action": "AUDIT_ACTION_PEER_ASSOCIATION", "event.details.calling_ae": "INTRUDER"}, 1
    )
    assert refused and refused[0]["event"]["outcome"] == "AUDIT_OUTCOME_DENIED"
    assert refused[0]["event"]["reason"] == "unknown calling AE title"


def test_certificate_of_another_ae_is_rejected(stack: Stack) -> None:
    # ECHO1's certificate presented under CT1's AE title: right CA, wrong peer.
    assoc = _associate(stack, "CT1", ECHO_PEER)
    assert assoc.is_rejected and not assoc.is_established


def test_certificate_from_another_ca_fails_the_handshake(stack: Stack, tmp_path: Path) -> None:
    assoc = _associate(stack, "CT1", CT_PEER, cert_dir=tmp_path / "foreign-ca")
    assert not assoc.is_established
    failed = _audit(
        stack, {"event.action": "AUDIT_ACTION_PEER_ASSOCIATION", "event.outcome": "AUDIT_OUTCOME_FAILURE"}, 1
    )
    assert failed and failed[0]["event"]["reason"].startswith("TLS handshake failed")


def test_echo_only_peer_may_not_store(stack: Stack) -> None:
    assoc = _associate(stack, "ECHO1", ECHO_PEER)
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        ds = _ct("DIMSE^ECHOONLY", 1, pydicom.uid.generate_uid())
        assert assoc.send_c_store(ds).Status == 0x0124
    finally:
        assoc.release()
    rejected = _audit(stack, {"event.action": "AUDIT_ACTION_INSTANCE_REJECTED", "event.actor": f"dimse:{ECHO_PEER}"}, 1)
    assert rejected and rejected[0]["event"]["reason"].startswith("not_authorised")


def test_malformed_instance_is_refused_and_the_association_goes_on(stack: Stack) -> None:
    study = pydicom.uid.generate_uid()
    bad = _ct("DIMSE^BAD", 1, study)
    del bad.StudyInstanceUID  # a CT image without its study cannot be filed anywhere
    good = _ct("DIMSE^BAD", 2, pydicom.uid.generate_uid())
    assoc = _associate(stack, "CT1", CT_PEER)
    assert assoc.is_established
    try:
        refused = assoc.send_c_store(bad)
        assert 0xC000 <= refused.Status <= 0xCFFF
        assert refused.ErrorComment
        assert assoc.send_c_store(good).Status == 0x0000
    finally:
        assoc.release()


def test_unsupported_sop_class_is_refused_at_negotiation(stack: Stack) -> None:
    # A query model on the storage AE: the context is rejected, the rest of the association stands.
    contexts = [build_context(CTImageStorage), build_context(StudyRootQueryRetrieveInformationModelFind)]
    assoc = associate(stack, stack.settings.dimse_port, DIMSE_AE_TITLE, "CT1", CT_PEER, contexts)
    assert assoc.is_established
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        rejected = {cx.abstract_syntax for cx in assoc.rejected_contexts}
        assert accepted == {CTImageStorage} and rejected == {StudyRootQueryRetrieveInformationModelFind}
        ds = _ct("DIMSE^NEGOTIATED", 1, pydicom.uid.generate_uid())
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()


def test_a_peer_abort_loses_nothing_acknowledged(stack: Stack, idp: LocalIssuer) -> None:
    """What got 0000 before the peer aborted is stored and readable; the listener takes the
    next association as before."""
    study = pydicom.uid.generate_uid()
    sent = [_ct("DIMSE^ABORT", i, study) for i in range(2)]
    assoc = _associate(stack, "CT1", CT_PEER)
    assert assoc.is_established
    for ds in sent:
        assert assoc.send_c_store(ds).Status == 0x0000
    assoc.abort()
    asyncio.run(stack.wait_indexed({study}))
    reader = idp.token("dr.house")
    for ds in sent:
        got = wado_uri(stack.settings, reader, dicom_samples.to_bytes(ds))
        assert got.status_code == 200
    again = _associate(stack, "CT1", CT_PEER)
    assert again.is_established
    try:
        assert again.send_c_echo().Status == 0x0000
    finally:
        again.release()


def test_dcmtk_storescu_and_echoscu_over_tls(stack: Stack, tmp_path: Path) -> None:
    try:
        storescu, echoscu = ensure_binaries("dcmtk", "storescu", "echoscu")
    except PackageMissing as exc:
        pytest.skip(f"DCMTK: {exc}")
    pki = stack.settings.pki
    if not pki.tls(CT_PEER).cert_file.exists():
        pki.issue(CT_PEER)
    tls = pki.tls(CT_PEER)
    tls_args = ["+tls", str(tls.key_file), str(tls.cert_file), "-pw", "+cf", str(pki.ca_file)]
    target = ["-aet", "CT1", "-aec", DIMSE_AE_TITLE, "127.0.0.1", str(stack.settings.dimse_port)]
    echo = subprocess.run([echoscu, *tls_args, *target], capture_output=True, text=True, timeout=60, check=False)
    assert echo.returncode == 0, echo.stderr[-2000:]

    study = pydicom.uid.generate_uid()
    files = []
    for i in range(3):
        path = tmp_path / f"ct{i}.dcm"
        path.write_bytes(dicom_samples.to_bytes(_ct("DIMSE^DCMTK", i, study)))
        files.append(str(path))
    store = subprocess.run(
        [storescu, *tls_args, *target, *files], capture_output=True, text=True, timeout=120, check=False
    )
    assert store.returncode == 0, store.stderr[-2000:]
    asyncio.run(stack.wait_indexed({study}))

    # The same tool with no TLS gets no association at all: the listener speaks TLS only.
    plain = subprocess.run([echoscu, *target], capture_output=True, text=True, timeout=60, check=False)
    assert plain.returncode != 0
