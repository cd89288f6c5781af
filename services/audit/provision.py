"""Set up the audit database with an admin connection: indexes, and a writer that may only
insert and find (plus list indexes, to check them at start). The service never runs with
more than that, so even a compromised audit service cannot rewrite history.

    MONGODB_ADMIN_URI=... python -m services.audit provision --password-file /run/secrets/audit-db-password
"""

from __future__ import annotations

import secrets
from typing import Any

from pymongo import AsyncMongoClient

from dicomsafe.common.mongo_users import ensure_role_and_user
from services.audit.store import AuditStore

WRITER_ROLE = "dicomsafe-audit-writer"
WRITER_USER = "dicomsafe-audit"
WRITER_ACTIONS = ["insert", "find", "listIndexes", "listCollections"]


async def provision(admin_uri: str, database: str, password: str | None = None) -> tuple[str, str]:
    """Returns (writer user, password); creates or updates both role and user."""
    password = password or secrets.token_urlsafe(24)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(admin_uri, serverSelectionTimeoutMS=10000)
    try:
        await AuditStore(client, database).ensure_indexes()
        await ensure_role_and_user(client, database, WRITER_ROLE, WRITER_USER, password, WRITER_ACTIONS)
    finally:
        await client.close()
    return WRITER_USER, password
