"""Reading the audit store directly, as `python -m services.audit verify` does (operator path).

Tests that count records use this instead of the Verify RPC: a Verify through the service is
itself audited (by the service and by authz), which would change the very counts observed.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pymongo import AsyncMongoClient

from services.audit.store import AuditStore, Verdict


async def verify_directly(
    mongodb_uri: str, database: str, public_keys: dict[int, Ed25519PublicKey] | None = None
) -> Verdict:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongodb_uri, serverSelectionTimeoutMS=5000)
    try:
        return await AuditStore(client, database).verify("", public_keys)
    finally:
        await client.close()
