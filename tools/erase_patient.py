"""GDPR erasure by crypto-shredding: destroy one patient's erasure key.

Every object of that patient — in the hot store, an archive or a backup — becomes
unreadable at once, without touching other patients' data. Refused unless authz grants the
acting subject `patient.erase`; the decision and the erasure are both audited. Vault must
also allow it: run with a short-lived erasure-officer token (policy
deploy/vault/erasure-officer-policy.hcl), never the crypto service's identity.

    VAULT_ADDR=... VAULT_TOKEN=<officer token> KAFKA_BOOTSTRAP=... TLS_CERT_FILE=... TLS_KEY_FILE=... TLS_CA_FILE=... \\
    python -m tools.erase_patient --actor dpo.lee --patient-id PID [--issuer ISSUER] --reason "request #123"
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import dataclass

from dicomsafe.common.audit_emitter import AuditEmitter
from dicomsafe.common.grpc_runtime import new_channel
from dicomsafe.common.kafka import Topics, new_producer
from dicomsafe.common.tls import TlsConfig, tls_from_env
from dicomsafe.v1 import audit_pb2, authz_pb2, authz_pb2_grpc
from services.crypto.vault_keys import TransitKeys, VaultSettings

ERASE_ACTION = "patient.erase"


class ErasureRefused(Exception):
    pass


@dataclass(frozen=True)
class ErasureRequest:
    actor: str
    patient_id: str
    issuer_of_patient_id: str
    reason: str


async def erase_patient(
    request: ErasureRequest,
    vault_addr: str,
    officer_token: str,
    authz_target: str,
    tls: TlsConfig | None,
    kafka_bootstrap: str,
    topics: Topics,
) -> str:
    """Returns the destroyed key's pseudonymous reference; raises ErasureRefused if not allowed."""
    if not request.reason.strip():
        raise ErasureRefused("an erasure needs a stated reason")
    async with new_channel(authz_target, tls) as channel:
        decision = await authz_pb2_grpc.AuthzServiceStub(channel).Check(
            authz_pb2.CheckRequest(
                subject=authz_pb2.Subject(id=request.actor),
                action=ERASE_ACTION,
                resource=authz_pb2.Resource(type="patient"),
                context={"purpose": "erasure"},
            ),
            timeout=30,
        )
    if not decision.allow:
        raise ErasureRefused(f"authz: {decision.reason}")
    keys = TransitKeys(VaultSettings(addr=vault_addr, transit_mount="transit", key_name="", token=officer_token))
    ref = await keys.erasure_ref(request.issuer_of_patient_id, request.patient_id)
    await keys.destroy_erasure_key(ref)
    producer = new_producer(kafka_bootstrap, "dicomsafe-erasure")
    await producer.start()
    try:
        await AuditEmitter(producer, "erasure", topics.audit).emit(
            audit_pb2.AuditAction.AUDIT_ACTION_PATIENT_ERASED,
            audit_pb2.AuditOutcome.AUDIT_OUTCOME_SUCCESS,
            request.actor,
            actor_roles=list(decision.roles),
            reason=request.reason,
            details={"erasure_key_ref": ref, "decision_id": decision.decision_id},
        )
    finally:
        await producer.stop()
    return ref


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--actor", required=True, help="the officer's subject id (checked by authz)")
    parser.add_argument("--patient-id", required=True)
    parser.add_argument("--issuer", default="", help="Issuer of Patient ID (0010,0021), if the hospital uses one")
    parser.add_argument("--reason", required=True)
    parser.add_argument("--authz", default=os.environ.get("AUTHZ_TARGET", "127.0.0.1:50052"))
    args = parser.parse_args()
    addr, token, kafka = (os.environ.get(k, "") for k in ("VAULT_ADDR", "VAULT_TOKEN", "KAFKA_BOOTSTRAP"))
    if not (addr and token and kafka):
        parser.error("set VAULT_ADDR, VAULT_TOKEN (erasure officer) and KAFKA_BOOTSTRAP")
    request = ErasureRequest(args.actor, args.patient_id, args.issuer, args.reason)
    try:
        ref = asyncio.run(erase_patient(request, addr, token, args.authz, tls_from_env(), kafka, Topics.from_env()))
    except ErasureRefused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    print(f"erased: erasure key {ref} destroyed; every object sealed with it is now unreadable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
