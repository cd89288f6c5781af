"""Seal+put and get+open throughput through the crypto service with sealed objects on S3, as a
ratio of the same service with a filesystem store, measured in the same run on the same bytes.

Two crypto services run side by side (same Kafka and Vault, same code), one per backend, and
take turns within each round so a burst of load elsewhere on the machine hits both alike. The
S3 server is whatever S3_* names (else the local SeaweedFS on loopback): on one machine the
ratio says what the extra HTTP hop, multipart and ranged GETs cost, not what a network adds.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

from dicomsafe.common.grpc_runtime import new_channel
from dicomsafe.common.kafka import Topics, ensure_topics, topic_specs
from dicomsafe.storage.object_store import S3Settings, StoreSettings, open_store
from dicomsafe.storage.store_fs import FileStore
from tools.bench.crypto_throughput import MIB, Client
from tools.bench.results import Result, ratio
from tools.stack import Stack, StackSettings, free_base_port

BUCKET = "dicomsafe-bench"


def _best_rate(size: int, seconds: list[float]) -> float:
    # The fastest of several runs is the least disturbed by other load on the machine.
    return size / MIB / min(seconds)


async def _measure(stacks: dict[str, Stack], data: bytes, rounds: int) -> dict[str, float]:
    sha = hashlib.sha256(data).hexdigest()
    times: dict[str, list[float]] = {}
    async with AsyncExitStack() as channels:
        clients: dict[str, Client] = {}
        for name, stack in stacks.items():
            s = stack.settings
            # Seal as ingest (key from crypto, put into the same store), open as the gateway, over
            # mutual TLS, as deployed.
            seal_ch = await channels.enter_async_context(new_channel(s.target("crypto"), s.pki.tls("ingest")))
            open_ch = await channels.enter_async_context(new_channel(s.target("crypto"), s.pki.tls("gateway")))
            store = (
                open_store(StoreSettings(s.crypto_store_url, s.s3))
                if s.crypto_store_url and s.s3
                else FileStore(s.work_dir / "store")
            )
            clients[name] = Client(seal_ch, open_ch, store)
            # Untimed: connections, the bucket's first writes and code paths warm up.
            await clients[name].round(data[: 64 * 1024], hashlib.sha256(data[: 64 * 1024]).hexdigest())
        order = list(clients)
        for i in range(rounds):
            for name in order[:: 1 if i % 2 == 0 else -1]:
                seal_s, open_s = await clients[name].round(data, sha)
                times.setdefault(f"{name}_seal", []).append(seal_s)
                times.setdefault(f"{name}_open", []).append(open_s)
    return {k: _best_rate(len(data), v) for k, v in times.items()}


def _row(metric: str, value: float, base: float) -> Result:
    # No target: #16 asks for the comparison to be shown, not for a bound.
    return Result(metric, round(value, 1), "MiB/s", round(base, 1), ratio(value, base), None, True)


def run(kafka: str, vault_addr: str, vault_token: str, s3: S3Settings, sizes: list[int], rounds: int) -> list[Result]:
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="dicomsafe-bench-store-") as tmp:
        work = Path(tmp)
        topics = Topics(prefix=f"benchstore{int(time.time())}.")
        asyncio.run(ensure_topics(kafka, topic_specs(topics, partitions=1)))
        stacks: dict[str, Stack] = {}
        prefix = f"run-{secrets.token_hex(4)}"
        try:
            for name, url in (("file", ""), ("s3", f"s3://{BUCKET}/{prefix}")):
                stack = Stack(
                    StackSettings(
                        kafka_bootstrap=kafka,
                        vault_addr=vault_addr,
                        mongodb_uri="",
                        vault_admin_token=vault_token,
                        work_dir=work / name,
                        topic_prefix=topics.prefix,
                        base_port=free_base_port(),
                        crypto_store_url=url,
                        s3=s3 if url else None,
                    )
                )
                stacks[name] = stack
                stack.start(("crypto",))
            for size in sizes:
                data = os.urandom(size * MIB)
                rate = asyncio.run(_measure(stacks, data, rounds if size <= 16 else max(2, rounds // 2)))
                results += [
                    _row(f"crypto_seal_put_s3_vs_fs_{size}MiB", rate["s3_seal"], rate["file_seal"]),
                    _row(f"crypto_get_open_s3_vs_fs_{size}MiB", rate["s3_open"], rate["file_open"]),
                ]
                del data
        finally:
            for stack in stacks.values():
                stack.stop()
    return results
