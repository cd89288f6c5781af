"""A DICOM peer in the tests: associations to our DIMSE listeners as a configured peer (or an
impostor), and the audit records they leave."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.events import EventHandlerType
from pynetdicom.presentation import PresentationContext

from dicomsafe.common.tls import TlsConfig
from services.audit.store import COLLECTION
from tools.pki import make_pki
from tools.stack import Stack


def peer_tls(stack: Stack, identity: str, cert_dir: Path | None = None) -> TlsConfig:
    """The peer's certificate from the stack's CA (issued on first use), or from a foreign CA
    in ``cert_dir``."""
    pki = stack.settings.pki
    if cert_dir is not None:
        return make_pki(cert_dir, identities=(identity,)).tls(identity)
    if not pki.tls(identity).cert_file.exists():
        pki.issue(identity)
    return pki.tls(identity)


def associate(
    stack: Stack,
    port: int,
    called: str,
    calling: str,
    identity: str,
    contexts: Sequence[PresentationContext],
    *,
    cert_dir: Path | None = None,
    handlers: Sequence[EventHandlerType] = (),
    ext_neg: Sequence[Any] = (),
) -> Association:
    tls = peer_tls(stack, identity, cert_dir)
    ctx = tls.client_ssl_context()
    if cert_dir is not None:
        # The foreign certificate is ours to present; the server is still checked against our CA.
        ctx.load_verify_locations(cafile=stack.settings.pki.ca_file)
    ae = AE(ae_title=calling)
    ae.requested_contexts = list(contexts)
    return ae.associate(
        "127.0.0.1",
        port,
        ae_title=called,
        tls_args=(ctx, "localhost"),
        evt_handlers=list(handlers),
        ext_neg=list(ext_neg) or None,
    )


async def audit_records(
    stack: Stack, query: dict[str, Any], at_least: int, timeout_s: float = 60.0
) -> list[dict[str, Any]]:
    """The audit trail's records matching ``query``, once there are ``at_least`` (or at the timeout)."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(stack.settings.mongodb_uri)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            found = await client[stack.settings.audit_db][COLLECTION].find(query).to_list(None)
            if len(found) >= at_least or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.5)
    finally:
        await client.close()
