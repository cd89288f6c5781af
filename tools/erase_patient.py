"""GDPR erasure by crypto-shredding: destroy one patient's erasure key.

Every object of that patient — in the hot store, an archive or a backup — becomes
unreadable at once, without touching other patients' data. Two gates, both required:

1. authz must grant `patient.erase` to the officer named by their OIDC access token (read
   from a file, never from the command line, where other users of the host could see it);
2. Vault must allow the destruction: run with a short-lived erasure-officer token (policy
   deploy/vault/erasure-officer-policy.hcl), never the crypto service's identity.

Audit first: the erasure request is acknowledged by the audit trail (`PATIENT_ERASURE_REQUESTED`)
before anything is destroyed — if the trail cannot take it, nothing is. Once the key is gone, a
`PatientErased` event (the pseudonym only, never the Patient ID) goes to `dicom.erased`, so the
gateway drops the patient's study index entries (names and IDs in clear), and `PATIENT_ERASED`
records the outcome. Destroying an already destroyed key is harmless and the index deletion is
idempotent, so an erasure whose event or completion record was lost is simply run again.

    VAULT_ADDR=... VAULT_TOKEN=<officer Vault token> KAFKA_BOOTSTRAP=... \\
    TLS_CERT_FILE=... TLS_KEY_FILE=... TLS_CA_FILE=... ERASE_ACCESS_TOKEN_FILE=<officer's OIDC token> \\
    python -m tools.erase_patient --patient-id PID [--issuer ISSUER] --reason "request #123"
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from dicomsafe.common.audit_emitter import AuditEmitter
from dicomsafe.common.grpc_runtime import new_channel
from dicomsafe.common.kafka import Topics, headers_for, new_producer
from dicomsafe.common.tls import TlsConfig, tls_from_env
from dicomsafe.common.vault import VaultUnavailable
from dicomsafe.v1 import audit_pb2, authz_pb2, authz_pb2_grpc, events_pb2
from services.crypto.vault_keys import TransitKeys, VaultSettings

ERASE_ACTION = "patient.erase"
TOKEN_FILE_ENV = "ERASE_ACCESS_TOKEN_FILE"  # noqa: S105 (a variable name)
# How long the audit trail may take to acknowledge an event before the erasure gives up.
AUDIT_ACK_TIMEOUT_S = 45.0
# What a send that did not reach the trail raises: the broker's errors, a timeout, the network.
_NOT_RECORDED = (KafkaError, TimeoutError, OSError)

Action = audit_pb2.AuditAction
Outcome = audit_pb2.AuditOutcome


class ErasureRefused(Exception):
    """Not authorised, or not recordable: nothing was destroyed."""


class ErasureFailed(Exception):
    """Authorised and recorded, but Vault did not destroy the key (recorded as FAILURE): retry."""


class ErasureUnrecorded(Exception):
    """The key was destroyed but its erasure event or completion record was not acknowledged: run it again."""


@dataclass(frozen=True)
class ErasureRequest:
    # The officer's OIDC access token: authz takes the subject from it. Kept out of repr.
    access_token: str = field(repr=False)
    patient_id: str = field(repr=False)
    issuer_of_patient_id: str = field(repr=False)
    reason: str


async def _authorise(request: ErasureRequest, authz_target: str, tls: TlsConfig | None) -> authz_pb2.CheckResponse:
    async with new_channel(authz_target, tls) as channel:
        decision = await authz_pb2_grpc.AuthzServiceStub(channel).Check(
            authz_pb2.CheckRequest(
                subject=authz_pb2.Subject(access_token=request.access_token),
                action=ERASE_ACTION,
                resource=authz_pb2.Resource(type="patient"),
                context={"purpose": "erasure"},
            ),
            timeout=30,
        )
    if not decision.allow:
        raise ErasureRefused(f"authz: {decision.reason}")
    if not decision.subject:
        # Deny by default: an allow that names nobody cannot be attributed in the trail.
        raise ErasureRefused("authz named no subject for the decision")
    return decision


async def _start_producer(kafka_bootstrap: str) -> AIOKafkaProducer:
    producer = new_producer(kafka_bootstrap, "dicomsafe-erasure")
    try:
        await asyncio.wait_for(producer.start(), AUDIT_ACK_TIMEOUT_S)
    except _NOT_RECORDED as exc:
        await producer.stop()
        raise ErasureRefused(f"audit trail unavailable ({type(exc).__name__}); nothing destroyed") from None
    return producer


async def _announce(producer: AIOKafkaProducer, topic: str, ref: str, request_id: str) -> None:
    """Tell the holders of derived copies (the gateway's study index) that the patient is erased.

    The producer is acks=all and idempotent: once this returns, every in-sync replica has it.
    """
    event = events_pb2.PatientErased(patient_ref=ref, request_id=request_id)
    event.erased_at.GetCurrentTime()
    await asyncio.wait_for(
        producer.send_and_wait(topic, event.SerializeToString(), key=ref.encode(), headers=headers_for(event)),
        AUDIT_ACK_TIMEOUT_S,
    )


async def erase_patient(
    request: ErasureRequest,
    vault_addr: str,
    officer_token: str,
    authz_target: str,
    tls: TlsConfig | None,
    kafka_bootstrap: str,
    topics: Topics,
) -> str:
    """Returns the destroyed key's pseudonymous reference.

    Raises ErasureRefused (nothing destroyed), ErasureFailed (Vault did not destroy; recorded)
    or ErasureUnrecorded (destroyed; erasure event not published or completion not recorded).
    """
    if not request.reason.strip():
        raise ErasureRefused("an erasure needs a stated reason")
    if not request.access_token.strip():
        raise ErasureRefused("an erasure needs the officer's access token")
    decision = await _authorise(request, authz_target, tls)
    keys = TransitKeys(VaultSettings(addr=vault_addr, transit_mount="transit", key_name="", token=officer_token))
    try:
        ref = await keys.erasure_ref(request.issuer_of_patient_id, request.patient_id)
    except VaultUnavailable as exc:
        raise ErasureRefused(f"{exc}; nothing destroyed") from None
    producer = await _start_producer(kafka_bootstrap)
    try:
        audit = AuditEmitter(producer, "erasure", topics.audit)

        async def record(action: Action.ValueType, outcome: Outcome.ValueType, **details: str) -> str:
            event = await asyncio.wait_for(
                audit.emit(
                    action,
                    outcome,
                    decision.subject,
                    actor_roles=list(decision.roles),
                    patient_ref=ref,
                    reason=request.reason,
                    details={"erasure_key_ref": ref, "decision_id": decision.decision_id, **details},
                ),
                AUDIT_ACK_TIMEOUT_S,
            )
            return event.event_id

        try:
            requested = await record(Action.AUDIT_ACTION_PATIENT_ERASURE_REQUESTED, Outcome.AUDIT_OUTCOME_SUCCESS)
        except _NOT_RECORDED as exc:
            raise ErasureRefused(f"audit trail unavailable ({type(exc).__name__}); nothing destroyed") from None
        try:
            await keys.destroy_erasure_key(ref)
        except VaultUnavailable as exc:
            failure = ErasureFailed(f"{exc}; the request is recorded, run the erasure again")
            # Best effort: the request event already says the erasure was attempted.
            with contextlib.suppress(*_NOT_RECORDED):
                await record(
                    Action.AUDIT_ACTION_PATIENT_ERASED, Outcome.AUDIT_OUTCOME_FAILURE, request_event_id=requested
                )
            raise failure from None
        # The outcome is about Vault and is recorded first; the announcement to the study index
        # is tried whatever became of that record. Each failure is reported on its own.
        left: list[str] = []
        try:
            await record(Action.AUDIT_ACTION_PATIENT_ERASED, Outcome.AUDIT_OUTCOME_SUCCESS, request_event_id=requested)
        except _NOT_RECORDED as exc:
            left.append(f"its completion was not recorded ({type(exc).__name__})")
        try:
            await _announce(producer, topics.erased, ref, requested)
        except _NOT_RECORDED as exc:
            left.append(f"the study index was not told and still lists the patient ({type(exc).__name__})")
        if left:
            raise ErasureUnrecorded(f"erasure key {ref} destroyed, but {'; '.join(left)}: run the erasure again")
    finally:
        await producer.stop()
    return ref


def read_access_token(path: str) -> str:
    """The officer's access token from a file ("-" = standard input)."""
    text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="ascii")
    return text.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--token-file",
        default=os.environ.get(TOKEN_FILE_ENV, ""),
        help=f"file holding the officer's OIDC access token, '-' for stdin (default: ${TOKEN_FILE_ENV})",
    )
    parser.add_argument("--patient-id", required=True)
    parser.add_argument("--issuer", default="", help="Issuer of Patient ID (0010,0021), if the hospital uses one")
    parser.add_argument("--reason", required=True)
    parser.add_argument("--authz", default=os.environ.get("AUTHZ_TARGET", "127.0.0.1:50052"))
    args = parser.parse_args()
    addr, token, kafka = (os.environ.get(k, "") for k in ("VAULT_ADDR", "VAULT_TOKEN", "KAFKA_BOOTSTRAP"))
    if not (addr and token and kafka):
        parser.error("set VAULT_ADDR, VAULT_TOKEN (erasure officer) and KAFKA_BOOTSTRAP")
    if not args.token_file:
        parser.error(f"give the officer's access token with --token-file or {TOKEN_FILE_ENV}")
    try:
        access_token = read_access_token(args.token_file)
    except (OSError, UnicodeDecodeError) as exc:
        parser.error(f"cannot read the access token file ({type(exc).__name__})")
    request = ErasureRequest(access_token, args.patient_id, args.issuer, args.reason)
    try:
        ref = asyncio.run(erase_patient(request, addr, token, args.authz, tls_from_env(), kafka, Topics.from_env()))
    except ErasureRefused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    except (ErasureFailed, ErasureUnrecorded) as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    print(f"erased: erasure key {ref} destroyed; every object sealed with it is now unreadable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
