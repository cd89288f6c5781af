"""authz ``Check``: latency p50/p99 and checks/s over gRPC, against the same decisions computed
in-process by ``decide`` in the same run.

The service runs as its own process (``python -m services.authz``) pinned to one core, with
its real audit path: every decision is produced to Kafka and acknowledged before the answer.
The load comes from this process over loopback gRPC. Besides the client-observed rate, the
service's own CPU time gives checks per core-second, which does not depend on how fast this
(Python) client can drive it.

Configurations: ``ids`` (policy file, development subject ids), ``tokens`` (every check
carries an ES256 OIDC access token verified against a real local issuer's JWKS) and
``grants`` (tokens plus the grant store read on every check).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pymongo import AsyncMongoClient

from dicomsafe.common.grpc_runtime import new_channel
from dicomsafe.common.kafka import Topics, ensure_topics, new_producer, topic_specs
from dicomsafe.common.tls import TlsConfig
from dicomsafe.v1 import audit_pb2, authz_pb2, authz_pb2_grpc
from services.authz.policy import RequestContext, ResourceRef, decide, load_policy
from tools.bench.process_cpu import cpu_seconds
from tools.bench.results import Result, ratio
from tools.oidc_issuer import LocalIssuer, running_issuer
from tools.pki import make_pki
from tools.ports import free_port as _free_port
from tools.stack import POLICY_FILE, REPO

TARGET_P99_MS = 2.0
TARGET_CHECKS_PER_S = 5000.0
# Requests in flight at once: a gateway fleet calls authz concurrently.
CONCURRENCY = 64
# Checks per CheckMany call, and calls in flight (as a few gateways' QIDO pages would be).
BATCH = 32
BATCH_CONCURRENCY = 4
MODES = ("ids", "tokens", "grants")
# (subject, action, labels, mfa): allows and denies of every kind, in a fixed rotation.
WORKLOAD: tuple[tuple[str, str, tuple[str, ...], bool], ...] = (
    ("dr.house", "instance.read", (), True),
    ("dr.wilson", "instance.read", ("vip",), False),
    ("res.rao", "instance.read", (), False),
    ("res.rao", "instance.read_deidentified", (), False),
    ("tech.jane", "instance.store", (), False),
    ("dr.cameron", "instance.read", (), False),
    ("mallory", "instance.read", (), False),
    ("aud.ito", "audit.read", ("restricted",), True),
)
RESOURCE = dict(type="instance", study_instance_uid="1.2.840.113619.2.55.3.9", object_id="ab" * 16)


@dataclass(frozen=True)
class Measured:
    rate: float
    p50_ms: float
    p99_ms: float
    cpu_s: float = 0.0


def _percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _in_process(n: int) -> Measured:
    """The same decisions by the pure function: what the service adds is everything else."""
    policy = load_policy(POLICY_FILE)
    inputs = [
        (
            s,
            a,
            ResourceRef(RESOURCE["type"], RESOURCE["study_instance_uid"], labels=frozenset(lb)),
            RequestContext(mfa=m),
        )
        for s, a, lb, m in WORKLOAD
    ]
    latencies = []
    t0 = time.perf_counter()
    for i in range(n):
        subject, action, resource, ctx = inputs[i % len(inputs)]
        started = time.perf_counter()
        decide(policy, subject, action, resource, ctx)
        latencies.append(time.perf_counter() - started)
    elapsed = time.perf_counter() - t0
    return Measured(n / elapsed, _percentile(latencies, 0.5) * 1000, _percentile(latencies, 0.99) * 1000)


async def _wait_serving(target: str, tls: TlsConfig, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with new_channel(target, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"authz exited with {proc.returncode}")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("authz not serving")
            await asyncio.sleep(0.2)


def _requests(issuer: LocalIssuer | None) -> list[authz_pb2.CheckRequest]:
    out = []
    for subject, action, labels, mfa in WORKLOAD:
        who = (
            authz_pb2.Subject(
                access_token=issuer.token(subject, amr=["pwd", "otp"] if mfa else ["pwd"], lifetime_s=3600)
            )
            if issuer
            else authz_pb2.Subject(id=subject)
        )
        resource = authz_pb2.Resource(**RESOURCE, labels=list(labels))
        out.append(authz_pb2.CheckRequest(subject=who, action=action, resource=resource))
    return out


async def _drive(
    target: str, tls: TlsConfig, requests: list[authz_pb2.CheckRequest], n: int, concurrency: int, pid: int
) -> Measured:
    async with new_channel(target, tls) as channel:
        stub = authz_pb2_grpc.AuthzServiceStub(channel)
        for r in requests:  # warm up (JWKS fetch, connections)
            await stub.Check(r, timeout=10)
        latencies: list[float] = []
        counter = iter(range(n))

        async def worker() -> None:
            for i in counter:
                started = time.perf_counter()
                await stub.Check(requests[i % len(requests)], timeout=10)
                latencies.append(time.perf_counter() - started)

        cpu0 = cpu_seconds(pid)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
        cpu = cpu_seconds(pid) - cpu0
    return Measured(n / elapsed, statistics.median(latencies) * 1000, _percentile(latencies, 0.99) * 1000, cpu)


async def _drive_many(
    target: str, tls: TlsConfig, requests: list[authz_pb2.CheckRequest], n: int, concurrency: int, pid: int
) -> Measured:
    """``n`` decisions in CheckMany calls of BATCH (a QIDO page's studies): decisions per second
    and per core-second, and the latency of one whole call."""
    batch = authz_pb2.CheckManyRequest(checks=[requests[i % len(requests)] for i in range(BATCH)])
    async with new_channel(target, tls) as channel:
        stub = authz_pb2_grpc.AuthzServiceStub(channel)
        await stub.CheckMany(batch, timeout=10)  # warm up
        latencies: list[float] = []
        counter = iter(range(max(1, n // BATCH)))

        async def worker() -> None:
            for _ in counter:
                started = time.perf_counter()
                answer = await stub.CheckMany(batch, timeout=30)
                latencies.append(time.perf_counter() - started)
                assert len(answer.results) == BATCH

        cpu0 = cpu_seconds(pid)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
        cpu = cpu_seconds(pid) - cpu0
    decisions = len(latencies) * BATCH
    return Measured(decisions / elapsed, statistics.median(latencies) * 1000, _percentile(latencies, 0.99) * 1000, cpu)


async def _health_floor(target: str, tls: TlsConfig, n: int, concurrency: int, pid: int) -> float:
    """gRPC health checks per core-second of the same process: the transport's own cost."""
    async with new_channel(target, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        counter = iter(range(n))

        async def worker() -> None:
            for _ in counter:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)

        cpu0 = cpu_seconds(pid)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / max(cpu_seconds(pid) - cpu0, 1e-9)


async def _audit_ack(kafka: str, topic: str, n: int) -> Measured:
    """One audit-sized record produced and acknowledged at a time: the latency floor of a check."""
    producer = new_producer(kafka, "bench-authz")
    await producer.start()
    try:
        event = audit_pb2.AuditEvent(event_id="0" * 36, service="authz", actor="dr.house", reason="granted by role")
        value = event.SerializeToString()
        latencies = []
        for _ in range(n):
            started = time.perf_counter()
            await producer.send_and_wait(topic, value, key=b"dr.house")
            latencies.append(time.perf_counter() - started)
    finally:
        await producer.stop()
    return Measured(n / sum(latencies), statistics.median(latencies) * 1000, _percentile(latencies, 0.99) * 1000)


@dataclass(frozen=True)
class ModeFigures:
    loaded: Measured
    single: Measured
    health_per_core: float
    batched: Measured


def _measure(kafka: str, mongo: str, mode: str, n: int) -> ModeFigures:
    topics = Topics(f"bench{os.getpid()}{mode}.")
    asyncio.run(ensure_topics(kafka, topic_specs(topics, partitions=1)))
    with tempfile.TemporaryDirectory() as tmp, running_issuer() as issuer:
        port = _free_port()
        # Mutual TLS as deployed; the load comes from the gateway's identity (allowed to Check).
        pki = make_pki(Path(tmp) / "pki", ["authz", "gateway"])
        client = pki.tls("gateway")
        env = {
            **{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR", "PYTHONPATH")},
            "KAFKA_BOOTSTRAP": kafka,
            "KAFKA_TOPIC_PREFIX": topics.prefix,
            "AUTHZ_GRPC_BIND": f"127.0.0.1:{port}",
            "AUTHZ_POLICY_FILE": str(POLICY_FILE),
            **pki.env("authz"),
        }
        if mode in ("tokens", "grants"):
            env |= {"AUTHZ_OIDC_ISSUER": issuer.url, "AUTHZ_OIDC_JWKS_URL": issuer.jwks_url}
        if mode == "grants":
            env |= {"AUTHZ_MONGODB_URI": mongo, "AUTHZ_MONGODB_DB": f"bench_authz_{os.getpid()}"}
        with (Path(tmp) / "authz.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "services.authz"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            # The target is per core: the service gets one, the load generator the rest.
            os.sched_setaffinity(proc.pid, {0})
            target = f"127.0.0.1:{port}"
            asyncio.run(_wait_serving(target, client, proc))
            requests = _requests(issuer if mode != "ids" else None)
            loaded = asyncio.run(_drive(target, client, requests, n, CONCURRENCY, proc.pid))
            single = asyncio.run(_drive(target, client, requests, max(100, n // 10), 1, proc.pid))
            floor = asyncio.run(_health_floor(target, client, n, CONCURRENCY, proc.pid))
            batched = asyncio.run(_drive_many(target, client, requests, n, BATCH_CONCURRENCY, proc.pid))
            return ModeFigures(loaded, single, floor, batched)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            if mode == "grants":
                asyncio.run(_drop(mongo, env["AUTHZ_MONGODB_DB"]))


async def _drop(mongo: str, database: str) -> None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo)
    try:
        await client.drop_database(database)
    finally:
        await client.close()


async def _ack_run(kafka: str, n: int) -> Measured:
    topics = Topics(f"bench{os.getpid()}ack.")
    await ensure_topics(kafka, topic_specs(topics, partitions=1))
    return await _audit_ack(kafka, topics.audit, n)


def _result(metric: str, value: float, unit: str, baseline: float, target: float | None, higher: bool) -> Result:
    return Result(metric, round(value, 3), unit, round(baseline, 4), ratio(value, baseline), target, higher)


def run(kafka: str, mongo: str, n: int, modes: Sequence[str] = MODES) -> list[Result]:
    local = _in_process(max(n, 20_000))
    ack = asyncio.run(_ack_run(kafka, max(100, n // 10)))
    # The latency floor "no decision without its audit record" imposes, for reference.
    results = [
        _result("authz_audit_ack_p50", ack.p50_ms, "ms", local.p50_ms, None, False),
        _result("authz_audit_ack_p99", ack.p99_ms, "ms", local.p99_ms, None, False),
    ]
    for mode in modes:
        # Every grant-store read is a MongoDB round trip: fewer checks keep that part short.
        count = n if mode != "grants" else max(200, n // 10)
        m = _measure(kafka, mongo, mode, count)
        per_core = count / m.loaded.cpu_s if m.loaded.cpu_s else 0.0
        results += [
            # Over gRPC at CONCURRENCY in flight vs the same decisions by decide() in-process.
            _result(f"authz_check_{mode}_rate", m.loaded.rate, "checks/s", local.rate, TARGET_CHECKS_PER_S, True),
            # Checks per second of the service's own CPU vs gRPC health checks per second of it.
            _result(f"authz_check_{mode}_per_core", per_core, "checks/s", m.health_per_core, TARGET_CHECKS_PER_S, True),
            # One check at a time (latency without queueing) vs decide() in-process.
            _result(f"authz_check_{mode}_p50", m.single.p50_ms, "ms", local.p50_ms, None, False),
            _result(f"authz_check_{mode}_p99", m.single.p99_ms, "ms", local.p99_ms, TARGET_P99_MS, False),
            # Under the concurrent load (queueing included).
            _result(f"authz_check_{mode}_p99_loaded", m.loaded.p99_ms, "ms", local.p99_ms, None, False),
            # BATCH checks per CheckMany call: decisions per core-second vs health RPCs per core-second.
            _result(
                f"authz_check_{mode}_batched_per_core",
                max(1, count // BATCH) * BATCH / m.batched.cpu_s if m.batched.cpu_s else 0.0,
                "checks/s",
                m.health_per_core,
                TARGET_CHECKS_PER_S,
                True,
            ),
            _result(f"authz_check_{mode}_batched_rate", m.batched.rate, "checks/s", local.rate, None, True),
            # One whole call of BATCH decisions, every one acknowledged by Kafka.
            _result(f"authz_check_{mode}_batched_call_p99", m.batched.p99_ms, "ms", local.p99_ms, None, False),
        ]
    return results
