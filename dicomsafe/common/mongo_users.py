"""Least-privilege MongoDB identities: one role and one user per service, set up with an admin
connection by deployment tooling, so a service never runs with more than its role allows."""

from __future__ import annotations

import urllib.parse
from collections.abc import Sequence
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.errors import OperationFailure

# Server error codes for "already exists": the setup is idempotent.
_ROLE_EXISTS, _USER_EXISTS = 51002, 51003


async def ensure_role_and_user(
    client: AsyncMongoClient[dict[str, Any]],
    database: str,
    role: str,
    user: str,
    password: str,
    actions: Sequence[str],
) -> None:
    """Create or update ``role`` (``actions`` on every collection of ``database``) and ``user`` with it."""
    db = client[database]
    privileges = [{"resource": {"db": database, "collection": ""}, "actions": list(actions)}]
    try:
        await db.command("createRole", role, privileges=privileges, roles=[])
    except OperationFailure as exc:
        if exc.code != _ROLE_EXISTS:
            raise
        await db.command("updateRole", role, privileges=privileges, roles=[])
    roles = [{"role": role, "db": database}]
    try:
        await db.command("createUser", user, pwd=password, roles=roles)
    except OperationFailure as exc:
        if exc.code != _USER_EXISTS:
            raise
        await db.command("updateUser", user, pwd=password, roles=roles)


def user_uri(admin_uri: str, database: str, user: str, password: str) -> str:
    """The admin URI's hosts and options with a service user's credentials (authSource = its database)."""
    parts = urllib.parse.urlsplit(admin_uri)
    hosts = parts.netloc.rsplit("@", 1)[-1]
    query = dict(urllib.parse.parse_qsl(parts.query))
    query["authSource"] = database
    userinfo = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}"
    return urllib.parse.urlunsplit(
        (parts.scheme, f"{userinfo}@{hosts}", parts.path or "/", urllib.parse.urlencode(query), "")
    )
