"""The audit writer may only insert and find: checked against a server that enforces roles.

The local SecantusDB runs with --auth and enforces them (per database); a real MongoDB via
MONGODB_URI does too. A server without access control cannot run this test, and says so.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from pymongo.errors import OperationFailure

from dicomsafe.common.mongo_users import user_uri
from services.audit.provision import provision
from services.audit.store import COLLECTION, AuditStore
from tests.servers import Servers

UNAUTHORIZED = 13


async def test_writer_can_insert_and_find_but_never_change_or_delete(servers: Servers, unique: str) -> None:
    if not urllib.parse.urlsplit(servers.mongodb_uri).username:
        pytest.skip(f"MongoDB at {servers.origin['mongo']} runs without access control: role enforcement not testable")
    database = f"audit_roles_{unique}"
    user, password = await provision(servers.mongodb_uri, database)
    writer: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(user_uri(servers.mongodb_uri, database, user, password))
    try:
        events = writer[database][COLLECTION]
        await events.insert_one({"chain": "c", "seq": 1, "event_id": "e1", "event": {}})
        assert (await events.find_one({"event_id": "e1"})) is not None
        await AuditStore(writer, database).check_indexes()  # listing indexes is allowed

        forbidden: dict[str, Callable[[], Awaitable[object]]] = {
            "update": lambda: events.update_one({"event_id": "e1"}, {"$set": {"event": {"x": 1}}}),
            "replace": lambda: events.replace_one({"event_id": "e1"}, {"event_id": "e1"}),
            "upsert": lambda: events.update_one({"event_id": "e2"}, {"$set": {"seq": 2}}, upsert=True),
            "delete": lambda: events.delete_one({"event_id": "e1"}),
            "drop": lambda: events.drop(),
            "create index": lambda: events.create_index("seq"),
            "grant itself a role": lambda: writer[database].command(
                "grantRolesToUser", user, roles=[{"role": "readWrite", "db": database}]
            ),
        }
        refused = []
        for name, attempt in forbidden.items():
            with pytest.raises(OperationFailure) as err:
                await attempt()
            assert err.value.code == UNAUTHORIZED, f"{name}: {err.value.code}"
            refused.append(name)
        assert refused == list(forbidden)
        assert await events.count_documents({}) == 1  # nothing was changed or removed
    finally:
        await writer.close()
