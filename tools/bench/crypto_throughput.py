"""Crypto seal/open throughput through gRPC, as a ratio of raw AES-256-GCM on the same bytes
measured in the same run (the machines are noisy; ratios travel, MB/s don't), plus peak RSS."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dicomsafe.common.grpc_runtime import new_channel
from dicomsafe.common.kafka import Topics, ensure_topics, topic_specs
from dicomsafe.common.tls import TlsConfig
from dicomsafe.v1 import crypto_pb2, crypto_pb2_grpc
from services.ingest.sealing import Sealer
from tools.bench.results import Result, ratio
from tools.stack import Stack, StackSettings

MIB = 1024 * 1024
# Target from the crypto issue: sealing/opening through the service keeps at least a quarter
# of raw AES-256-GCM throughput.
TARGET_RATIO = 0.25


def _best_rate(size: int, seconds: list[float]) -> float:
    # The fastest of several runs is the least disturbed by other load on the machine.
    return size / MIB / min(seconds)


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmHWM in /proc status")


def raw_aes_gcm(data: bytes, rounds: int) -> tuple[float, float]:
    key = AESGCM(AESGCM.generate_key(bit_length=256))
    enc, dec = [], []
    for _ in range(rounds):
        nonce = os.urandom(12)
        t0 = time.perf_counter()
        sealed = key.encrypt(nonce, data, None)
        t1 = time.perf_counter()
        key.decrypt(nonce, sealed, None)
        t2 = time.perf_counter()
        enc.append(t1 - t0)
        dec.append(t2 - t1)
    return _best_rate(len(data), enc), _best_rate(len(data), dec)


async def _timed(rounds: int, call: Callable[[int], Awaitable[object]]) -> list[float]:
    times = []
    for i in range(rounds):
        t0 = time.perf_counter()
        await call(i)
        times.append(time.perf_counter() - t0)
    return times


async def through_grpc(
    target: str, seal_tls: TlsConfig, open_tls: TlsConfig, data: bytes, rounds: int
) -> tuple[float, float]:
    """Over mutual TLS 1.3, as deployed: sealing as ingest, opening as the gateway."""
    sha = hashlib.sha256(data).hexdigest()
    async with new_channel(target, seal_tls) as seal_channel, new_channel(target, open_tls) as open_channel:
        # Same piece size as ingest uses: one sealed chunk per message.
        sealer = Sealer(crypto_pb2_grpc.CryptoServiceStub(seal_channel), 256 * 1024, 600)
        stub = crypto_pb2_grpc.CryptoServiceStub(open_channel)
        ids = [secrets.token_hex(32) for _ in range(rounds)]

        async def seal(i: int) -> object:
            meta = crypto_pb2.SealMetadata(
                object_id=ids[i], sop_instance_uid="1.2.3.4", study_instance_uid="1.2.3", expected_sha256=sha
            )
            return await sealer.seal(data, meta)

        async def open_(i: int) -> object:
            total = 0
            async for piece in stub.Open(crypto_pb2.OpenRequest(object_id=ids[i]), timeout=600):
                total += len(piece.data)
            assert total == len(data)
            return total

        seal_times = await _timed(rounds, seal)
        open_times = await _timed(rounds, open_)
    return _best_rate(len(data), seal_times), _best_rate(len(data), open_times)


def run(kafka: str, vault_addr: str, vault_token: str, sizes: list[int], rounds: int) -> list[Result]:
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="dicomsafe-bench-") as tmp:
        work = Path(tmp)
        topics = Topics(prefix=f"bench{int(time.time())}.")
        asyncio.run(ensure_topics(kafka, topic_specs(topics, partitions=1)))
        stack = Stack(
            StackSettings(
                kafka_bootstrap=kafka,
                vault_addr=vault_addr,
                mongodb_uri="",
                vault_admin_token=vault_token,
                work_dir=work,
                topic_prefix=topics.prefix,
                base_port=51051,
            )
        )
        stack.start(("crypto",))
        try:
            for size in sizes:
                data = os.urandom(size * MIB)
                n = rounds if size <= 16 else max(2, rounds // 2)
                raw_enc, raw_dec = raw_aes_gcm(data, n)
                seal, open_ = asyncio.run(
                    through_grpc(
                        stack.settings.target("crypto"),
                        stack.settings.client_tls("ingest"),
                        stack.settings.client_tls("gateway"),
                        data,
                        n,
                    )
                )
                for name, value, base in (("seal", seal, raw_enc), ("open", open_, raw_dec)):
                    results.append(
                        Result(
                            metric=f"crypto_{name}_grpc_{size}MiB",
                            value=round(value, 1),
                            unit="MiB/s",
                            baseline=round(base, 1),
                            ratio=ratio(value, base),
                            target=TARGET_RATIO,
                            higher_is_better=True,
                        )
                    )
                del data
            # Bounded memory: the service's peak RSS should not grow with the object size.
            peak = _peak_rss_mib(stack.processes["crypto"].pid)
            largest = max(sizes)
            results.append(Result("crypto_peak_rss", peak, "MiB", float(largest), ratio(peak, largest), None, False))
        finally:
            stack.stop()
    return results
