"""`python -m services.audit` runs the service; `python -m services.audit verify [--chain C]` checks the trail."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from pymongo import AsyncMongoClient

from services.audit.app import main as serve
from services.audit.config import AuditConfig
from services.audit.store import AuditStore


async def _verify(chain: str) -> int:
    cfg = AuditConfig.from_env()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(cfg.mongodb_uri, serverSelectionTimeoutMS=5000)
    try:
        verdict = await AuditStore(client, cfg.database).verify(chain)
    finally:
        await client.close()
    print(f"{verdict.records} records in {verdict.chains} chains")
    for b in verdict.breaks:
        print(f"BROKEN {b.chain} at seq {b.seq}: {b.reason}")
    print("OK" if verdict.ok else "TAMPERING OR LOSS DETECTED")
    return 0 if verdict.ok else 1


if len(sys.argv) > 1:
    parser = argparse.ArgumentParser(prog="python -m services.audit")
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="recompute every hash chain and name the first broken record")
    verify.add_argument("--chain", default="")
    args = parser.parse_args()
    sys.exit(asyncio.run(_verify(args.chain)))
serve()
