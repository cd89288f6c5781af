"""Signed checkpoints on `audit.checkpoints`, a copy outside the audit database.

Someone who can delete records from MongoDB can delete the newest checkpoints beside them, and
the shortened chain then verifies. A checkpoint also published to Kafka (kept forever, written
with a producer identity the database administrator need not hold, and mirrored by operators to
WORM storage if they like) survives that. A chain's hash at seq N commits to every record up to
N, so for verification the newest valid published checkpoint of each chain is all that counts:
reading the topic needs memory per chain, not per checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.message import DecodeError

from dicomsafe.common.kafka import client_security, headers_for
from dicomsafe.v1 import audit_pb2
from services.audit.chain import CHECKPOINT_MALFORMED, CHECKPOINT_SIGNATURE_INVALID, Break
from services.audit.checkpoints import Checkpoint, signature_valid


async def publish(producer: AIOKafkaProducer, topic: str, checkpoint: Checkpoint) -> None:
    """Returns once the broker acknowledged it on every in-sync replica (acks=all)."""
    message = audit_pb2.AuditCheckpoint(
        chain=checkpoint.chain, seq=checkpoint.seq, hash=checkpoint.hash, signature=checkpoint.signature
    )
    message.signed_at.GetCurrentTime()
    await producer.send_and_wait(
        topic, message.SerializeToString(), key=checkpoint.chain.encode(), headers=headers_for(message)
    )


@dataclass
class Published:
    """The newest validly signed checkpoint of each chain on the topic, and what was wrong."""

    newest: dict[str, Checkpoint] = field(default_factory=dict)
    read: int = 0
    breaks: list[Break] = field(default_factory=list)


async def read_published(
    bootstrap: str, topic: str, public_keys: Mapping[int, Ed25519PublicKey], timeout_ms: int = 2000
) -> Published:
    """Everything on the topic up to its end at the time of the call, without a consumer group
    (a verifier leaves no committed offsets behind)."""
    partitions = await _partitions(bootstrap, topic)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed", **client_security()
    )
    await consumer.start()
    out = Published()
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        remaining = {tp for tp in partitions if ends[tp] > 0}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=timeout_ms)
            if not batch:
                raise TimeoutError(f"Kafka topic {topic}: no records within {timeout_ms} ms before its end")
            for tp, records in batch.items():
                for record in records:
                    _take(out, record.value or b"", dict(public_keys))
                if records and records[-1].offset + 1 >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()
    return out


async def _partitions(bootstrap: str, topic: str) -> list[TopicPartition]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client_security())
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    numbers = sorted(int(p["partition"]) for d in described if d.get("error_code", 0) == 0 for p in d["partitions"])
    if not numbers:
        raise RuntimeError(f"Kafka topic {topic} missing")
    return [TopicPartition(topic, n) for n in numbers]


def _take(out: Published, value: bytes, public_keys: dict[int, Ed25519PublicKey]) -> None:
    out.read += 1
    try:
        message = audit_pb2.AuditCheckpoint.FromString(value)
    except DecodeError:
        out.breaks.append(Break("", 0, "published checkpoint malformed", CHECKPOINT_MALFORMED))
        return
    cp = Checkpoint(message.chain, message.seq, message.hash, message.signature)
    if not cp.chain or not signature_valid(public_keys, cp):
        # Only someone able to write the topic could put this here: evidence, not noise.
        out.breaks.append(
            Break(cp.chain, cp.seq, "published checkpoint signature invalid", CHECKPOINT_SIGNATURE_INVALID)
        )
        return
    if cp.seq > out.newest.get(cp.chain, Checkpoint(cp.chain, 0, "", "")).seq:
        out.newest[cp.chain] = cp
