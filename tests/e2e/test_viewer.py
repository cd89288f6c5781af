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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from playwright.sync_api import Browser, Page, sync_playwright

from dicomsafe.common.kafka import Topics
from dicomsafe.v1 import audit_pb2
from tests.topic_reader import read_to_end
from tools.debian_packages import PackageMissing, ensure_binaries
from tools.oidc_issuer import LocalIssuer
from tools.ports import free_port
from tools.stack import HTTPS_CERT, Stack
from tools.viewer import (
    CLIENT_ID,
    ViewerConfig,
    ViewerMissing,
    ViewerServer,
    ensure_ohif,
    store_instances,
    viewer_studies,
)

# The viewer's origin must be known before the gateway starts (its CORS allowlist).
VIEWER_PORT = free_port()
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
    ct_description: str


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
    ct_study, us_study, files = viewer_studies(seed=11)
    store_instances(stack.settings.dicomweb_url, stack.settings.ca_file, idp.token("tech.jane"), files)
    asyncio.run(stack.wait_indexed({ct_study, us_study}))
    first = pydicom.dcmread(io.BytesIO(files[0]))
    return Studies(ct_study, us_study, str(first.PatientName), str(first.PatientID), str(first.StudyDescription))


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


def _signed_in(browser: Browser, viewer: ViewerServer, users: Users, user: str) -> tuple[Page, str]:
    """A new browser session signed in as ``user``, on the study list: (page, its text)."""
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    page.goto(viewer.origin + "/")
    page.wait_for_selector("#username")  # OHIF sent the browser to the issuer's sign-in
    page.fill("#username", user)
    page.fill("#password", users.passwords[user])
    # The list is drawn from this QIDO-RS answer, made with the token the sign-in gave.
    with page.expect_response(lambda r: "/dicomweb/studies?" in r.url) as listed:
        page.click("#sign-in")
    assert listed.value.status in (200, 204), listed.value.status
    page.wait_for_selector("text=Study List")
    page.wait_for_load_state("networkidle")
    return page, page.inner_text("body")


# Of the first viewport's canvas (2D: cornerstone copies its WebGL drawing there): how many pixels
# are not black, and how many distinct grey levels they have.
_CANVAS_STATS = """() => {
  const c = document.querySelector('div.viewport-element canvas.cornerstone-canvas');
  if (!c) return null;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let lit = 0; const levels = new Set();
  for (let i = 0; i < d.length; i += 4) { if (d[i] | d[i + 1] | d[i + 2]) { lit++; levels.add(d[i]); } }
  return {lit, levels: levels.size, total: d.length / 4};
}"""


def _rendered(page: Page, study: str, viewer: ViewerServer) -> dict[str, int]:
    """Open ``study`` in the viewer; the canvas once an image is drawn in it (or AssertionError)."""
    page.goto(f"{viewer.origin}/viewer?StudyInstanceUIDs={study}")
    page.wait_for_selector("div.viewport-element canvas.cornerstone-canvas")
    for _ in range(PAGE_TIMEOUT_MS // 1000):
        stats = page.evaluate(_CANVAS_STATS)
        if stats and stats["lit"] > stats["total"] // 10 and stats["levels"] > 32:
            return dict(stats)
        page.wait_for_timeout(1000)
    raise AssertionError(f"nothing drawn for study {study}: {page.evaluate(_CANVAS_STATS)}")


def test_radiologist_signs_in_and_sees_ct_and_ultrasound_rendered(
    stack: Stack, studies: Studies, browser: Browser, viewer: ViewerServer, users: Users
) -> None:
    page, listed = _signed_in(browser, viewer, users, "dr.house")
    assert studies.ct_description in listed
    assert studies.patient_name.split("^")[0] in listed.upper()

    frames_before = {e.sop_instance_uid for e in _views(stack, "dr.house", studies.ct)}
    for study in (studies.ct, studies.us):
        _rendered(page, study, viewer)

    # Each image OHIF showed was released by the gateway to dr.house, and audited as such.
    retrieved = audit_pb2.AuditAction.AUDIT_ACTION_INSTANCE_RETRIEVED
    success = audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS
    for study in (studies.ct, studies.us):
        views = _views(stack, "dr.house", study)
        parts = {e.details.get("part", "") for e in views if e.action == retrieved and e.outcome == success}
        assert "metadata" in parts and any(p.startswith("frames:") for p in parts), (study, parts)
    assert not frames_before


def test_researcher_sees_no_original_identifier(
    stack: Stack, studies: Studies, browser: Browser, viewer: ViewerServer, users: Users
) -> None:
    page, listed = _signed_in(browser, viewer, users, "res.rao")
    assert "CT" in listed and "US" in listed  # the studies are there, de-identified
    for original in (studies.patient_id, studies.patient_name.split("^")[0], studies.ct_description):
        assert original not in listed.upper()
    assert studies.ct not in page.content()
    queried = audit_pb2.AuditAction.AUDIT_ACTION_STUDY_QUERIED
    assert any(e.action == queried and e.details.get("deidentified") == "true" for e in _events(stack, "res.rao"))


def test_user_without_a_role_sees_no_study(
    stack: Stack, studies: Studies, browser: Browser, viewer: ViewerServer, users: Users
) -> None:
    page, listed = _signed_in(browser, viewer, users, "mallory")
    assert studies.ct_description not in listed and "SYNTHETIC" not in listed
    page.goto(f"{viewer.origin}/viewer?StudyInstanceUIDs={studies.ct}")
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(3000)
    stats = page.evaluate(_CANVAS_STATS)
    assert stats is None or stats["lit"] == 0, stats
    assert not [
        e
        for e in _events(stack, "mallory")
        if e.outcome == audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS
        and e.action == audit_pb2.AuditAction.AUDIT_ACTION_INSTANCE_RETRIEVED
    ]
    assert _events(stack, "mallory"), "mallory's searches are in the audit stream"


def _events(stack: Stack, actor: str) -> list[audit_pb2.AuditEvent]:
    topic = Topics(stack.settings.topic_prefix).audit
    # Playwright's sync API runs an event loop on this thread: the consumer gets a thread of its own.
    with ThreadPoolExecutor(max_workers=1) as pool:
        values = pool.submit(asyncio.run, read_to_end(stack.settings.kafka_bootstrap, topic)).result()
    return [e for e in (audit_pb2.AuditEvent.FromString(v) for v in values) if e.actor == actor]


def _views(stack: Stack, actor: str, study: str) -> list[audit_pb2.AuditEvent]:
    return [e for e in _events(stack, actor) if e.study_instance_uid == study and e.service == "gateway"]
