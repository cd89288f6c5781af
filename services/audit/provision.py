"""Set up the audit database with an admin connection: indexes, and a writer that may only
insert and find (plus list indexes, to check them at start). The service never runs with
more than that, so even a compromised audit service cannot rewrite history.

    MONGODB_ADMIN_URI=... python -m services.audit provision --password-file /run/secrets/audit-db-password
"""

from __future__ import annotations

import secrets
import urllib.parse
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.errors import OperationFailure

from services.audit.store import AuditStore

WRITER_ROLE = "dicomsafe-audit-writer"
WRITER_USER = "dicomsafe-audit"
WRITER_ACTIONS = ["insert", "find", "listIndexes", "listCollections"]
# Server error codes for "already exists": the setup is idempotent.
_ROLE_EXISTS, _USER_EXISTS = 51002, 51003


async def provision(admin_uri: str, database: str, password: str | None = None) -> tuple[str, str]:
    """Returns (writer user, password); creates or updates both role and user."""
    password = password or secrets.token_urlsafe(24)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(admin_uri, serverSelectionTimeoutMS=10000)
    try:
        await AuditStore(client, database).ensure_indexes()
        db = client[database]
        privileges = [{"resource": {"db": database, "collection": ""}, "actions": WRITER_ACTIONS}]
        try:
            await db.command("createRole", WRITER_ROLE, privileges=privileges, roles=[])
        except OperationFailure as exc:
            if exc.code != _ROLE_EXISTS:
                raise
            await db.command("updateRole", WRITER_ROLE, privileges=privileges, roles=[])
        roles = [{"role": WRITER_ROLE, "db": database}]
        try:
            await db.command("createUser", WRITER_USER, pwd=password, roles=roles)
        except OperationFailure as exc:
            if exc.code != _USER_EXISTS:
                raise
            await db.command("updateUser", WRITER_USER, pwd=password, roles=roles)
    finally:
        await client.close()
    return WRITER_USER, password


def writer_uri(admin_uri: str, database: str, user: str, password: str) -> str:
    """The admin URI's hosts and options with the writer's credentials (authSource = its database)."""
    parts = urllib.parse.urlsplit(admin_uri)
    hosts = parts.netloc.rsplit("@", 1)[-1]
    query = dict(urllib.parse.parse_qsl(parts.query))
    query["authSource"] = database
    userinfo = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}"
    return urllib.parse.urlunsplit(
        (parts.scheme, f"{userinfo}@{hosts}", parts.path or "/", urllib.parse.urlencode(query), "")
    )
