"""Orthanc (tools.orthanc) as the e2e tests use it: skipped where its packages cannot be
installed, driven through its REST API with failures that point at its log."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from tools.orthanc import OrthancMissing, RunningOrthanc, running_orthanc


@contextmanager
def orthanc_or_skip(work: Path, config: Mapping[str, Any], dicom_port: int | None = None) -> Iterator[RunningOrthanc]:
    try:
        with running_orthanc(work, config, dicom_port) as running:
            yield running
    except OrthancMissing as exc:
        pytest.skip(f"Orthanc: {exc}")


def orthanc_post(orthanc: RunningOrthanc, path: str, body: Any, timeout_s: float = 120) -> Any:
    """POST to Orthanc's REST API; its JSON answer (None if empty)."""
    reply = requests.post(f"{orthanc.http}{path}", json=body, timeout=timeout_s)
    assert reply.ok, f"{path}: {reply.status_code} {reply.text[:2000]} (log: {orthanc.log_file})"
    return reply.json() if reply.content else None
