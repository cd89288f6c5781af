"""C-STORE with DCMTK's storescu against dicomsafe and against Orthanc, same files, same run.

dicomsafe's storage AE speaks DICOM TLS only (mutual, 1.3): each instance is validated,
sealed, announced and audited before its C-STORE response. Orthanc (Debian) is measured twice:
with DICOM TLS on its side too, the like-for-like baseline, and with its plaintext default,
for the figure a default installation gives. One association per side sends every file, as a
modality sending a study does.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from pydicom.uid import generate_uid

from tools import dicom_samples
from tools.bench.bench_stack import running_stack, stack_cpu_seconds
from tools.bench.process_cpu import cpu_seconds
from tools.bench.results import Result, ratio
from tools.debian_packages import ensure_binaries
from tools.orthanc import running_orthanc
from tools.pki import Pki
from tools.ports import free_port
from tools.stack import DIMSE_AE_TITLE

PEER = "bench-modality"
PEER_AE = "BENCHCT"
WARM_UP_INSTANCES = 20
# Longer than the indexer's grace period: its share of each instance's CPU counts.
SETTLE_S = 2.5


def _files(work: Path, count: int, prefix: str) -> list[Path]:
    """0.5 MB CT slices of one study (512 x 512, 16 bit), as a CT sends them."""
    study = generate_uid()
    paths = []
    for i in range(count):
        path = work / f"{prefix}{i:05d}.dcm"
        path.write_bytes(dicom_samples.to_bytes(dicom_samples.ct_image(study_uid=study, seed=i)))
        paths.append(path)
    return paths


def _storescu(storescu: str, tls_args: list[str], called: str, port: int, files: list[Path]) -> float:
    """Seconds to send ``files`` on one association."""
    started = time.perf_counter()
    done = subprocess.run(
        [storescu, *tls_args, "-aet", PEER_AE, "-aec", called, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
        # Debian's DCMTK leaves Nagle on unless asked: every instance would wait for a
        # delayed ACK (~20 instances/s whoever receives).
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"storescu to {called} failed: {done.stderr[-2000:]}")
    return elapsed


def _orthanc_rate(
    work: Path, storescu: str, files: list[Path], warm_up: list[Path], pki: Pki | None
) -> tuple[float, float]:
    """(instances/s, CPU ms per instance) of Orthanc, with DICOM TLS when ``pki`` is given."""
    extra: dict[str, object] = {"DicomAet": "ORTHANC"}
    tls_args: list[str] = []
    if pki is not None:
        tls = pki.tls(PEER)
        extra |= {
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(tls.cert_file),
            "DicomTlsPrivateKey": str(tls.key_file),
            "DicomTlsTrustedCertificates": str(tls.ca_file),
            "DicomTlsRemoteCertificateRequired": True,
        }
        tls_args = ["+tls", str(tls.key_file), str(tls.cert_file), "-pw", "+cf", str(tls.ca_file)]
    work.mkdir()
    with running_orthanc(work, extra, free_port()) as orthanc:
        _storescu(storescu, tls_args, "ORTHANC", orthanc.dicom_port, warm_up)
        before = cpu_seconds(orthanc.pid)
        elapsed = _storescu(storescu, tls_args, "ORTHANC", orthanc.dicom_port, files)
        cpu_ms = (cpu_seconds(orthanc.pid) - before) * 1000 / len(files)
    return len(files) / elapsed, cpu_ms


def run(kafka: str, vault_addr: str, vault_token: str, mongodb_uri: str, count: int) -> list[Result]:
    (storescu,) = ensure_binaries("dcmtk", "storescu")
    with tempfile.TemporaryDirectory(prefix="dicomsafe-bench-dimse-") as tmp:
        work = Path(tmp)
        files, warm_up = _files(work, count, "m"), _files(work, WARM_UP_INSTANCES, "w")
        peers = work / "dimse-peers.json"
        peers.write_text(
            json.dumps(
                {
                    "peers": [
                        {
                            "name": PEER,
                            "ae_title": PEER_AE,
                            "certificate": PEER,
                            "addresses": ["127.0.0.1/32"],
                            "services": ["store"],
                        }
                    ]
                }
            )
        )
        with running_stack(kafka, vault_addr, vault_token, mongodb_uri, work, "benchdimse", peers) as (stack, _):
            pki = stack.settings.pki
            tls = pki.issue(PEER)
            tls_args = ["+tls", str(tls.key_file), str(tls.cert_file), "-pw", "+cf", str(tls.ca_file)]
            port = stack.settings.dimse_port
            _storescu(storescu, tls_args, DIMSE_AE_TITLE, port, warm_up)
            before = stack_cpu_seconds(stack)
            elapsed = _storescu(storescu, tls_args, DIMSE_AE_TITLE, port, files)
            time.sleep(SETTLE_S)
            after = stack_cpu_seconds(stack)
            spent = {name: after[name] - before[name] for name in before}
            print("C-STORE CPU ms per instance:", {k: round(v * 1000 / len(files), 1) for k, v in spent.items()})
            our_rate, our_cpu_ms = len(files) / elapsed, sum(spent.values()) * 1000 / len(files)
            tls_rate, tls_cpu_ms = _orthanc_rate(work / "orthanc-tls", storescu, files, warm_up, pki)
        plain_rate, _ = _orthanc_rate(work / "orthanc-plain", storescu, files, warm_up, None)
    # No issue names a target for C-STORE: reported against both baselines, judged by none.
    return [
        Result(
            "dimse_cstore_instances_per_s",
            round(our_rate, 1),
            "inst/s",
            round(tls_rate, 1),
            ratio(our_rate, tls_rate),
            None,
            True,
        ),
        Result(
            "dimse_cstore_instances_per_s_vs_plaintext_orthanc",
            round(our_rate, 1),
            "inst/s",
            round(plain_rate, 1),
            ratio(our_rate, plain_rate),
            None,
            True,
        ),
        Result(
            "dimse_cstore_cpu_ms_per_instance",
            round(our_cpu_ms, 2),
            "ms",
            round(tls_cpu_ms, 2),
            ratio(our_cpu_ms, tls_cpu_ms),
            None,
            False,
        ),
    ]
