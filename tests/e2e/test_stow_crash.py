"""The gateway killed with SIGKILL in the middle of STOW-RS uploads (it seals and stores the
instances itself since #15), then started again, as Kubernetes restarts a pod:

- every instance a response acknowledged is stored, retrievable byte for byte and audited;
- the uploads that were cut off, sent again, are stored once each (no duplicate objects, no
  refusal: a seal that completed before the kill is recognised as the same object);
- a put cut off by the kill never became an object: at most a temp file of sealed bytes, which
  the store's leftover clean-up drops; nothing in the store holds plaintext.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import threading
import time
import uuid
from typing import Any

import pydicom
import requests
from pymongo import AsyncMongoClient

from dicomsafe.storage.store_fs import FileStore
from services.audit.store import COLLECTION
from tests.own_site import wado_uri
from tools import dicom_samples
from tools.oidc_issuer import LocalIssuer
from tools.stack import Stack

BATCHES = 16
PER_BATCH = 10
# The kill lands once this many instances are acknowledged: well inside the uploads.
KILL_AT = 4 * PER_BATCH


def _batches(marker: str) -> list[list[bytes]]:
    study = pydicom.uid.generate_uid()
    out = []
    for b in range(BATCHES):
        batch = []
        for i in range(PER_BATCH):
            ds = dicom_samples.ct_image(study_uid=study, seed=b * PER_BATCH + i, rows=128, columns=128)
            ds.PatientName = marker
            batch.append(dicom_samples.to_bytes(ds))
        out.append(batch)
    return out


def _stow(stack: Stack, token: str, parts: list[bytes]) -> requests.Response:
    boundary = "b" + uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n" for p in parts)
    return requests.post(
        f"{stack.settings.dicomweb_url}/studies",
        data=body + f"--{boundary}--\r\n".encode(),
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Authorization": f"Bearer {token}",
            "Accept": "application/dicom+json",
        },
        verify=str(stack.settings.ca_file),
        timeout=60,
    )


def _acknowledged(response: requests.Response) -> set[str]:
    body: dict[str, Any] = response.json()
    return {str(item["00081155"]["Value"][0]) for item in body.get("00081199", {}).get("Value", [])}


def _sop(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


async def _stored_audited(stack: Stack) -> set[str]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(stack.settings.mongodb_uri)
    try:
        found = await client[stack.settings.audit_db][COLLECTION].distinct(
            "event.sop_instance_uid", {"event.action": "AUDIT_ACTION_INSTANCE_STORED"}
        )
        return {str(uid) for uid in found}
    finally:
        await client.close()


def test_gateway_killed_mid_stow_loses_nothing_acknowledged(stack: Stack, idp: LocalIssuer) -> None:
    marker = f"STOWKILL^{uuid.uuid4().hex[:8].upper()}"
    batches = _batches(marker)
    by_sop = {_sop(d): d for batch in batches for d in batch}
    token = idp.token("tech.jane")
    acknowledged: set[str] = set()
    unanswered: list[list[bytes]] = []
    lock = threading.Lock()

    def upload() -> None:
        for i, batch in enumerate(batches):
            try:
                response = _stow(stack, token, batch)
            except requests.RequestException:
                # Cut off by the kill (or refused while the gateway is down): the client's to resend.
                unanswered.extend(batches[i:])
                return
            assert response.status_code == 200, response.text
            with lock:
                acknowledged.update(_acknowledged(response))

    uploader = threading.Thread(target=upload)
    uploader.start()
    deadline = time.monotonic() + 120
    while True:
        with lock:
            if len(acknowledged) >= KILL_AT:
                break
        assert time.monotonic() < deadline and uploader.is_alive(), "uploads did not get going"
        time.sleep(0.02)
    gateway = stack.processes.pop("gateway")
    os.killpg(gateway.pid, signal.SIGKILL)  # mid-request: no chance to abort a put or answer
    gateway.wait(30)
    uploader.join(120)
    assert not uploader.is_alive()
    assert unanswered, "the kill must land mid-upload"
    assert KILL_AT <= len(acknowledged) < len(by_sop)

    stack.start(("gateway",))
    # Every acknowledged instance is stored and opens to what was sent (to a physician: the
    # technologist who stored them may not view images).
    reader = idp.token("dr.house")
    for sop in sorted(acknowledged):
        got = wado_uri(stack.settings, reader, by_sop[sop])
        assert got.status_code == 200 and got.content == by_sop[sop], sop
    # The client sends again what got no answer: each stored once, none refused as a duplicate.
    for batch in unanswered:
        response = _stow(stack, token, batch)
        assert response.status_code == 200, response.text
        acknowledged |= _acknowledged(response)
    assert acknowledged == set(by_sop)

    store = FileStore(stack.settings.work_dir / "store", leftover_age_s=0)
    assert len(list(store.object_ids())) == len(by_sop), "one object per instance"
    store.remove_leftovers()
    assert store.leftover_temp_files() == []
    for path in (stack.settings.work_dir / "store").rglob("*"):
        if path.is_file():
            raw = path.read_bytes()
            assert bytes(128) + b"DICM" not in raw and marker.encode() not in raw, path.name

    deadline = time.monotonic() + 60
    while (audited := asyncio.run(_stored_audited(stack))) < set(by_sop):
        assert time.monotonic() < deadline, f"{len(set(by_sop) - audited)} stored instances not audited"
        time.sleep(1)
