"""Orthanc from Debian's packages as a real peer: the DICOMweb baseline of the benches and a
remote PACS for the DIMSE tests. Installed on first use (tools.debian_packages), started on
loopback with a configuration of the caller's, stopped afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from tools.debian_packages import PackageMissing, apt_install
from tools.ports import free_port

ORTHANC = Path("/usr/sbin/Orthanc")
ORTHANC_DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class OrthancMissing(RuntimeError):
    pass


def ensure_orthanc() -> None:
    if ORTHANC.exists() and ORTHANC_DICOMWEB.exists():
        return
    try:
        apt_install("orthanc", "orthanc-dicomweb")
    except PackageMissing as exc:
        raise OrthancMissing(str(exc)) from None
    if not (ORTHANC.exists() and ORTHANC_DICOMWEB.exists()):
        raise OrthancMissing(f"Orthanc packages installed but {ORTHANC} or {ORTHANC_DICOMWEB} is missing")
    # The package's maintainer script may start a system Orthanc; it would compete for CPU.
    subprocess.run(["pkill", "-x", "Orthanc"], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@dataclass(frozen=True)
class RunningOrthanc:
    # The REST API, e.g. http://127.0.0.1:8042
    http: str
    dicom_port: int
    pid: int
    log_file: Path

    @property
    def root(self) -> str:
        """The DICOMweb root."""
        return f"{self.http}/dicom-web"


@contextmanager
def running_orthanc(
    work: Path, extra: Mapping[str, Any] | None = None, dicom_port: int | None = None
) -> Iterator[RunningOrthanc]:
    """Orthanc with its defaults plus DICOMweb, on free loopback ports; ``extra`` adds or
    overrides configuration keys (DICOM TLS, modalities, the AE title)."""
    ensure_orthanc()
    http, dicom = free_port(), dicom_port or free_port()
    storage = work / "orthanc"
    storage.mkdir()
    config = {
        "Name": "bench",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http,
        "DicomPort": dicom,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(ORTHANC_DICOMWEB)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        **(extra or {}),
    }
    path = work / "orthanc.json"
    path.write_text(json.dumps(config))
    log_file = work / "orthanc.log"
    with log_file.open("wb") as log:
        # Debian's DCMTK, inside Orthanc, leaves Nagle on unless TCP_NODELAY=1: each C-STORE then
        # waits for a delayed ACK (~20 instances/s). A fair baseline turns it off.
        env = {**os.environ, "TCP_NODELAY": "1"}
        proc = subprocess.Popen([str(ORTHANC), str(path)], stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{base}/system", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not start; see {log_file}")
            time.sleep(0.3)
        yield RunningOrthanc(base, dicom, proc.pid, log_file)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
