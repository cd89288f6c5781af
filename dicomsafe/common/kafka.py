"""Kafka plumbing: topic layout, record headers, producers/consumers with safe defaults,
dead-lettering and the commit-after-effect consume loop every consumer service uses."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import CommitFailedError, TopicAlreadyExistsError
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp

from dicomsafe.common.config import ConfigError, env_opt
from dicomsafe.common.metrics import RECORDS, RETRIES
from dicomsafe.common.tls import TlsConfig, tls_from_env
from dicomsafe.v1 import events_pb2

CONTENT_TYPE = b"application/x-protobuf"

# Records larger than this never go to Kafka whole: big instances travel by reference.
DEFAULT_MAX_RECORD_BYTES = 8 * 1024 * 1024
# A dead letter keeps the original value only below this size; above it, the hash, the
# size and the source offset identify the record (still retained in the source topic).
DLQ_MAX_ORIGINAL_BYTES = 1024 * 1024


def dlq_topic(topic: str) -> str:
    return f"{topic}.dlq"


@dataclass(frozen=True)
class Topics:
    """Topic names; a prefix lets several deployments (or test runs) share one cluster."""

    prefix: str = ""

    @classmethod
    def from_env(cls) -> Topics:
        return cls(os.environ.get("KAFKA_TOPIC_PREFIX", ""))

    @property
    def ingest(self) -> str:
        return f"{self.prefix}dicom.ingest"

    @property
    def stored(self) -> str:
        return f"{self.prefix}dicom.stored"

    @property
    def erased(self) -> str:
        return f"{self.prefix}dicom.erased"

    @property
    def audit(self) -> str:
        return f"{self.prefix}audit.events"

    @property
    def alerts(self) -> str:
        return f"{self.prefix}security.alerts"

    @property
    def checkpoints(self) -> str:
        return f"{self.prefix}audit.checkpoints"


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    configs: dict[str, str] = field(default_factory=dict)


def topic_specs(topics: Topics, partitions: int = 6) -> list[TopicSpec]:
    """The topics the pipeline needs. Partition count bounds the replicas of a consumer group."""
    keep = {"min.insync.replicas": "1"}
    big = {"max.message.bytes": str(DEFAULT_MAX_RECORD_BYTES + 65536)}
    return [
        TopicSpec(topics.ingest, partitions, {**keep, **big}),
        TopicSpec(dlq_topic(topics.ingest), 1, {**keep, "retention.ms": "-1", **big}),
        TopicSpec(topics.stored, partitions, keep),
        TopicSpec(dlq_topic(topics.stored), 1, {**keep, "retention.ms": "-1"}),
        # Kept forever: a consumer down for longer than a retention period must still learn of
        # every erasure (the records hold pseudonyms only, and there are few).
        TopicSpec(topics.erased, partitions, {**keep, "retention.ms": "-1"}),
        TopicSpec(dlq_topic(topics.erased), 1, {**keep, "retention.ms": "-1"}),
        TopicSpec(topics.audit, partitions, keep),
        TopicSpec(dlq_topic(topics.audit), 1, {**keep, "retention.ms": "-1"}),
        TopicSpec(topics.alerts, 1, {**keep, "retention.ms": "-1"}),
        # Signed audit chain heads, kept forever: the copy a database administrator cannot delete.
        TopicSpec(topics.checkpoints, 1, {**keep, "retention.ms": "-1"}),
    ]


def client_security() -> dict[str, Any]:
    """How every Kafka client here connects: ``KAFKA_SECURITY_PROTOCOL`` ``PLAINTEXT`` (default)
    or ``SSL`` — TLS 1.3, presenting this workload's certificate (``TLS_*``) and verifying the
    brokers against ``KAFKA_SSL_CA_FILE`` (default ``TLS_CA_FILE``: a cluster CA of its own,
    e.g. Strimzi's, is common)."""
    protocol = env_opt("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT").upper()
    if protocol == "PLAINTEXT":
        return {}
    if protocol != "SSL":
        raise ConfigError("KAFKA_SECURITY_PROTOCOL must be PLAINTEXT or SSL")
    tls = tls_from_env()
    if tls is None:
        raise ConfigError("KAFKA_SECURITY_PROTOCOL=SSL needs TLS_CERT_FILE, TLS_KEY_FILE and TLS_CA_FILE")
    broker_ca = env_opt("KAFKA_SSL_CA_FILE")
    if broker_ca:
        tls = TlsConfig(tls.cert_file, tls.key_file, Path(broker_ca))
    return {"security_protocol": "SSL", "ssl_context": tls.client_ssl_context()}


async def ensure_topics(bootstrap: str, specs: Iterable[TopicSpec], replication: int = 1) -> None:
    """Create missing topics with explicit partition counts (brokers never auto-create)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client_security())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(name=s.name, num_partitions=s.partitions, replication_factor=replication, topic_configs=s.configs)
            for s in specs
            if s.name not in existing
        ]
        if missing:
            # Another process may create them between list and create.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
    finally:
        await admin.close()


async def require_topics(bootstrap: str, names: Sequence[str]) -> None:
    """Fail fast with a clear message instead of hanging on an unknown topic."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client_security())
    await admin.start()
    try:
        missing = sorted(set(names) - set(await admin.list_topics()))
    finally:
        await admin.close()
    if missing:
        raise RuntimeError(f"Kafka topics missing: {', '.join(missing)} (create them with `make topics`)")


def headers_for(message: Message, trace_id: str | None = None) -> list[tuple[str, bytes]]:
    return [
        ("content-type", CONTENT_TYPE),
        ("schema", message.DESCRIPTOR.full_name.encode()),
        ("trace-id", (trace_id or uuid.uuid4().hex).encode()),
    ]


def header(record: ConsumerRecord[bytes, bytes], name: str) -> str | None:
    for key, value in record.headers or ():
        if key == name:
            return bytes(value).decode("utf-8", "replace")
    return None


def new_producer(
    bootstrap: str, client_id: str, max_request_bytes: int = DEFAULT_MAX_RECORD_BYTES + 65536
) -> AIOKafkaProducer:
    # acks=all + idempotence: a send that returned is on every in-sync replica, and a
    # retried send is not duplicated by the broker.
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        client_id=client_id,
        acks="all",
        enable_idempotence=True,
        compression_type="lz4",
        max_request_size=max_request_bytes,
        request_timeout_ms=30000,
        **client_security(),
    )


FETCH_MIN_BYTES = 32 * 1024
FETCH_MAX_WAIT_MS = 500


def new_consumer(bootstrap: str, group_id: str, topics: Sequence[str], client_id: str) -> AIOKafkaConsumer:
    # Offsets are committed by hand, only after the effect of a record is durable.
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        group_id=group_id,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_partition_fetch_bytes=DEFAULT_MAX_RECORD_BYTES + 65536,
        fetch_max_bytes=4 * (DEFAULT_MAX_RECORD_BYTES + 65536),
        # Under load the broker answers a fetch once it has this much, or after the wait: one
        # fetch (and one bulk insert, one commit) per few dozen events instead of one per event
        # (measured on STOW-RS: audit's and the broker's CPU per instance about halved). The wait
        # bounds what a quiet stream adds to an event's way into the audit store; a shorter one
        # costs idle CPU (at 100 ms the idle broker doubled its load).
        fetch_min_bytes=FETCH_MIN_BYTES,
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        **client_security(),
    )


M = TypeVar("M", bound=Message)


class PermanentError(Exception):
    """This record can never be processed as it is: dead-letter it and move on.

    ``reason`` must be free of PHI and key material; it is published and logged.
    """

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class TransientError(Exception):
    """A dependency is unavailable: keep the record, retry later, never dead-letter."""


def decode_value(record: ConsumerRecord[bytes, bytes], message_type: type[M], code: str) -> M:
    """The record's protobuf value; PermanentError ``code`` when it is not one (dead-lettered)."""
    try:
        return message_type.FromString(record.value or b"")
    except DecodeError:
        raise PermanentError(code, f"value is not a {message_type.DESCRIPTOR.full_name} message") from None


class DeadLetterPublisher:
    def __init__(self, producer: AIOKafkaProducer, service: str) -> None:
        self._producer = producer
        self.service = service

    async def publish(self, record: ConsumerRecord[bytes, bytes], code: str, reason: str) -> None:
        value = record.value or b""
        letter = events_pb2.DeadLetter(
            source_topic=record.topic,
            source_partition=record.partition,
            source_offset=record.offset,
            original_key=record.key or b"",
            original_sha256=hashlib.sha256(value).hexdigest(),
            original_size=len(value),
            reason_code=code,
            reason=reason,
            service=self.service,
        )
        if len(value) <= DLQ_MAX_ORIGINAL_BYTES:
            letter.original_value = value
        ts = Timestamp()
        ts.GetCurrentTime()
        letter.failed_at.CopyFrom(ts)
        hdrs = headers_for(letter, header(record, "trace-id"))
        hdrs.append(("dlq-reason", code.encode()))
        await self._producer.send_and_wait(
            dlq_topic(record.topic), letter.SerializeToString(), key=record.key, headers=hdrs
        )


Handler = Callable[[ConsumerRecord[bytes, bytes]], Awaitable[None]]
# Processes a partition's records as one unit (e.g. one bulk insert). Any error other than a
# TransientError makes the loop redo those records one by one, isolating a bad record.
BatchHandler = Callable[[list[ConsumerRecord[bytes, bytes]]], Awaitable[None]]


@dataclass
class RetryPolicy:
    first_delay_s: float = 0.5
    max_delay_s: float = 15.0
    # Unexpected errors (bugs, not outages) are retried this often, then dead-lettered,
    # so one poison record cannot block its partition forever.
    max_unexpected_attempts: int = 5


async def consume_forever(
    consumer: AIOKafkaConsumer,
    handle: Handler,
    dead_letters: DeadLetterPublisher,
    stop: asyncio.Event,
    log: logging.Logger,
    retry: RetryPolicy | None = None,
    handle_batch: BatchHandler | None = None,
    max_records: int = 50,
) -> None:
    """Process records per partition, in order; commit an offset only after the record's
    effect (or its dead letter) is durable. With ``handle_batch``, a partition's records are
    first tried as one batch and committed together."""
    policy = retry or RetryPolicy()
    service = dead_letters.service
    delay = policy.first_delay_s
    unexpected: dict[tuple[TopicPartition, int], int] = {}

    def put_back(tp: TopicPartition, offset: int, why: str) -> None:
        consumer.seek(tp, offset)
        RETRIES.labels(service, tp.topic).inc()
        log.warning(
            "record kept for a retry",
            extra={"topic": tp.topic, "partition": tp.partition, "offset": offset, "error": why},
        )

    async def commit(tp: TopicPartition, next_offset: int) -> bool:
        try:
            await consumer.commit({tp: next_offset})
        except CommitFailedError:
            # Partition moved to another replica; it will redeliver, and handlers are idempotent.
            log.warning("commit failed after rebalance", extra={"topic": tp.topic, "partition": tp.partition})
            return False
        return True

    while not stop.is_set():
        batches = await consumer.getmany(timeout_ms=500, max_records=max_records)
        backoff = False
        for tp, records in batches.items():
            if handle_batch is not None and len(records) > 1:
                try:
                    await handle_batch(records)
                except TransientError as exc:
                    put_back(tp, records[0].offset, str(exc))
                    backoff = True
                    continue
                except Exception:  # noqa: BLE001 - redone record by record below, which isolates the cause
                    log.info("batch failed; processing its records one by one", extra={"partition": tp.partition})
                else:
                    RECORDS.labels(service, tp.topic, "processed").inc(len(records))
                    await commit(tp, records[-1].offset + 1)
                    delay = policy.first_delay_s
                    continue
            # One commit per partition batch, after each record's effect is durable: a record
            # that fails transiently is redelivered with the ones after it (handlers are idempotent).
            done: int | None = None
            for record in records:
                outcome = "processed"
                try:
                    await handle(record)
                except PermanentError as exc:
                    outcome = "dead_lettered"
                    log.warning(
                        "record dead-lettered",
                        extra={
                            "topic": tp.topic,
                            "partition": tp.partition,
                            "offset": record.offset,
                            "reason_code": exc.code,
                        },
                    )
                    await dead_letters.publish(record, exc.code, exc.reason)
                except TransientError as exc:
                    put_back(tp, record.offset, str(exc))
                    backoff = True
                    break
                except Exception as exc:
                    key = (tp, record.offset)
                    unexpected[key] = unexpected.get(key, 0) + 1
                    log.exception(
                        "unexpected error processing record",
                        extra={
                            "topic": tp.topic,
                            "partition": tp.partition,
                            "offset": record.offset,
                            "attempt": unexpected[key],
                        },
                    )
                    if unexpected[key] < policy.max_unexpected_attempts:
                        put_back(tp, record.offset, type(exc).__name__)
                        backoff = True
                        break
                    unexpected.pop(key, None)
                    outcome = "dead_lettered"
                    await dead_letters.publish(record, "unexpected_error", type(exc).__name__)
                RECORDS.labels(service, tp.topic, outcome).inc()
                done = record.offset + 1
                delay = policy.first_delay_s
            if done is not None:
                await commit(tp, done)
        if backoff:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
            delay = min(delay * 2, policy.max_delay_s)
