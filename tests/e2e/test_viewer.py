"""A real OHIF v3 viewer (npm @ohif/app, its prebuilt dist/) in Debian's headless Chromium, against
the gateway over TLS 1.3, with users signing in at the development OpenID Connect issuer.

A radiologist signs in, sees the study list, opens a CT series and a multi-frame ultrasound and
gets pixels on screen; a researcher's list holds no original identifier; a user without a role
sees no study; every view is in the audit stream under the user who made it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pydicom
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from PIL import Image
from playwright.sync_api import Browser, Page, sync_playwright

from dicomsafe.common.kafka import Topics
from dicomsafe.v1 import audit_pb2
from tests.topic_reader import read_to_end
from tools import dicom_samples
from tools.debian_packages import PackageMissing, ensure_binaries
from tools.oidc_issuer import LocalIssuer
from tools.stack import HTTPS_CERT, Stack
from tools.viewer import CLIENT_ID, ViewerConfig, ViewerMissing, ViewerServer, ensure_ohif


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The viewer's origin must be known before the gateway starts (its CORS allowlist).
VIEWER_PORT = _free_port()
VIEWER_ORIGIN = f"http://127.0.0.1:{VIEWER_PORT}"
CORS_ORIGINS = (VIEWER_ORIGIN,)
# A page that has not rendered within this long has failed; most take a few seconds.
PAGE_TIMEOUT_MS = 90_000
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass(frozen=True)
class Studies:
    ct: str
    us: str
    patient_name: str
    patient_id: str


@dataclass(frozen=True)
class Users:
    passwords: dict[str, str]


@pytest.fixture(scope="module")
def chromium() -> str:
    try:
        return ensure_binaries("chromium", "chromium")[0]
    except PackageMissing as exc:
        pytest.skip(f"Debian's chromium is needed: {exc}")


@pytest.fixture(scope="module")
def studies(stack: Stack, idp: LocalIssuer) -> Studies:
    patient = dicom_samples.synthetic_patient("viewer-e2e")
    ct_study, us_study = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ct = [dicom_samples.ct_image(study_uid=ct_study, seed=i, patient=patient, rows=128, columns=128) for i in range(4)]
    for number, slice_ in enumerate(ct, start=1):
        slice_.SeriesInstanceUID, slice_.SeriesNumber, slice_.InstanceNumber = ct[0].SeriesInstanceUID, 1, number
    us = dicom_samples.us_multiframe(study_uid=us_study, seed=5, patient=patient, frames=8, rows=96, columns=128)
    boundary = secrets.token_hex(12)
    body = (
        b"".join(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + dicom_samples.to_bytes(ds) + b"\r\n"
            for ds in (*ct, us)
        )
        + f"--{boundary}--\r\n".encode()
    )
    reply = requests.post(
        f"{stack.settings.dicomweb_url}/studies",
        data=body,
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Authorization": f"Bearer {idp.token('tech.jane')}",
            "Accept": "application/dicom+json",
        },
        verify=str(stack.settings.ca_file),
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    asyncio.run(stack.wait_indexed({ct_study, us_study}))
    return Studies(ct_study, us_study, str(patient.name), str(patient.patient_id))


@pytest.fixture(scope="module")
def users(idp: LocalIssuer) -> Users:
    passwords = {user: secrets.token_urlsafe(16) for user in ("dr.house", "res.rao", "mallory")}
    for user, password in passwords.items():
        idp.login.add_user(user, password)
    idp.login.register_client(CLIENT_ID, [f"{VIEWER_ORIGIN}/callback"])
    return Users(passwords)


@pytest.fixture(scope="module")
def viewer(stack: Stack, idp: LocalIssuer, users: Users) -> Iterator[ViewerServer]:
    try:
        dist = ensure_ohif()
    except ViewerMissing as exc:
        pytest.skip(str(exc))
    server = ViewerServer(dist, ViewerConfig(stack.settings.dicomweb_url, idp.url), port=VIEWER_PORT).start()
    try:
        yield server
    finally:
        server.stop()


def _spki_pin(stack: Stack) -> str:
    """The gateway certificate's key pin: Chromium trusts that one key, not the whole machine."""
    cert = x509.load_pem_x509_certificate((stack.settings.pki.directory / f"{HTTPS_CERT}.crt").read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture(scope="module")
def browser(chromium: str, stack: Stack, viewer: ViewerServer) -> Iterator[Browser]:
    with sync_playwright() as p:
        launched = p.chromium.launch(
            executable_path=chromium,
            args=[*CHROMIUM_FLAGS, f"--ignore-certificate-errors-spki-list={_spki_pin(stack)}"],
        )
        try:
            yield launched
        finally:
            launched.close()


def _signed_in(browser: Browser, viewer: ViewerServer, users: Users, user: str) -> Page:
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    page.goto(viewer.origin + "/")
    page.wait_for_selector("#username")  # OHIF sent the browser to the issuer's sign-in
    page.fill("#username", user)
    page.fill("#password", users.passwords[user])
    page.click("#sign-in")
    page.wait_for_url(f"{viewer.origin}/**")
    return page


def _study_list_text(page: Page) -> str:
    page.wait_for_selector('[data-cy="study-list-results"]', state="attached")
    page.wait_for_load_state("networkidle")
    return page.inner_text("body")


def _rendered_viewport(page: Page) -> np.ndarray:
    """The first viewport's pixels once an image is drawn in it (grey levels)."""
    canvas = page.locator("canvas.cornerstone-canvas").first
    canvas.wait_for(state="visible")
    for _ in range(60):
        shot = np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("L"))
        if shot.std() > 5 and len(np.unique(shot)) > 16:
            return shot
        page.wait_for_timeout(1000)
    raise AssertionError("the viewport stayed blank")


def _views(stack: Stack, actor: str, study: str) -> list[audit_pb2.AuditEvent]:
    values = asyncio.run(read_to_end(stack.settings.kafka_bootstrap, Topics(stack.settings.topic_prefix).audit))
    events = [audit_pb2.AuditEvent.FromString(v) for v in values]
    return [e for e in events if e.actor == actor and e.study_instance_uid == study and e.service == "gateway"]


def test_radiologist_signs_in_and_sees_ct_and_ultrasound_rendered(
    stack: Stack, studies: Studies, browser: Browser, viewer: ViewerServer, users: Users
) -> None:
    page = _signed_in(browser, viewer, users, "dr.house")
    listed = _study_list_text(page)
    assert studies.patient_id in listed

    for study in (studies.ct, studies.us):
        page.goto(f"{viewer.origin}/viewer?StudyInstanceUIDs={study}")
        pixels = _rendered_viewport(page)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100

    retrieved = audit_pb2.AuditAction.AUDIT_ACTION_INSTANCE_RETRIEVED
    for study in (studies.ct, studies.us):
        views = [e for e in _views(stack, "dr.house", study) if e.action == retrieved]
        assert any(e.outcome == audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS for e in views), study
        assert all(e.details.get("part") for e in views)


def test_researcher_sees_no_original_identifier(
    stack: Stack, studies: Studies, browser: Browser, viewer: ViewerServer, users: Users
) -> None:
    page = _signed_in(browser, viewer, users, "res.rao")
    listed = _study_list_text(page)
    assert studies.patient_id not in listed
    assert studies.patient_name.split("^")[0] not in listed
    assert studies.ct not in page.content()


def test_user_without_a_role_sees_no_study(
    stack: Stack, studies: Studies, browser: Browser, viewer: ViewerServer, users: Users
) -> None:
    page = _signed_in(browser, viewer, users, "mallory")
    listed = _study_list_text(page)
    assert studies.patient_id not in listed
    page.goto(f"{viewer.origin}/viewer?StudyInstanceUIDs={studies.ct}")
    page.wait_for_load_state("networkidle")
    assert not page.locator("canvas.cornerstone-canvas").count() or _blank(page)
    denied = [
        e for e in _views(stack, "mallory", studies.ct) if e.outcome == audit_pb2.AuditOutcome.AUDIT_OUTCOME_DENIED
    ]
    assert denied


def _blank(page: Page) -> bool:
    shot = np.asarray(Image.open(io.BytesIO(page.locator("canvas.cornerstone-canvas").first.screenshot())).convert("L"))
    return bool(shot.std() < 5)
