"""Set up the study index database with an admin connection: indexes, and the gateway's user,
which may read, upsert and delete index entries (deletes: a crypto-shredded patient's entries)
and nothing else (no drop, no user or role admin)."""

from __future__ import annotations

import secrets
from typing import Any

from pymongo import AsyncMongoClient

from dicomsafe.common.mongo_users import ensure_role_and_user, provision_with_password_file
from services.gateway.study_index import StudyIndex

INDEX_ROLE = "dicomsafe-gateway-index"
INDEX_USER = "dicomsafe-gateway"
INDEX_ACTIONS = ["find", "insert", "update", "remove", "listIndexes", "listCollections", "createIndex"]


async def provision_index(admin_uri: str, database: str, password: str | None = None) -> tuple[str, str]:
    """Returns (user, password); creates or updates both role and user."""
    password = password or secrets.token_urlsafe(24)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(admin_uri, serverSelectionTimeoutMS=10000)
    try:
        await StudyIndex(client, database).ensure_indexes()
        await ensure_role_and_user(client, database, INDEX_ROLE, INDEX_USER, password, INDEX_ACTIONS)
    finally:
        await client.close()
    return INDEX_USER, password


def main() -> None:
    """``MONGODB_ADMIN_URI=... python -m services.gateway.provision --password-file F [--database D]``"""
    import argparse
    from pathlib import Path

    from dicomsafe.common.config import env_secret

    parser = argparse.ArgumentParser(description="Create the study index's indexes and the gateway's database user.")
    parser.add_argument("--password-file", type=Path, required=True, help="read if present, else written")
    parser.add_argument("--database", default="dicomsafe_index")
    args = parser.parse_args()
    admin_uri = env_secret("MONGODB_ADMIN_URI")
    if not admin_uri:
        raise SystemExit("MONGODB_ADMIN_URI (or _FILE) is required")
    user = provision_with_password_file(args.password_file, lambda pw: provision_index(admin_uri, args.database, pw))
    print(f"study index ready; user {user}")


if __name__ == "__main__":
    main()
