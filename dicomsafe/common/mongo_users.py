"""Least-privilege MongoDB identities: one role and one user per service, set up with an admin
connection by deployment tooling, so a service never runs with more than its role allows."""

from __future__ import annotations

import asyncio
import os
import urllib.parse
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
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


def provision_with_password_file(
    password_file: Path, provision: Callable[[str | None], Coroutine[Any, Any, tuple[str, str]]]
) -> str:
    """Runs ``provision(password)`` with the password kept in ``password_file`` or, the first
    time, with a new one that is then written there (owner-only, never over another file).
    Returns the user. Re-running keeps the password, so the deployed connection string stays valid."""
    existing = password_file.read_text(encoding="utf-8").strip() if password_file.exists() else None
    user, password = asyncio.run(provision(existing))
    if existing is None:
        password_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(password)
    return user
