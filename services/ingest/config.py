from __future__ import annotations

from dataclasses import dataclass

from dicomsafe.common.config import env_int, env_opt, env_str
from dicomsafe.common.kafka import DEFAULT_MAX_RECORD_BYTES
from dicomsafe.common.peer_auth import PeerAllowlist
from dicomsafe.common.tls import TlsConfig, tls_from_env

# Store (the STOW-RS path) only for the gateway.
DEFAULT_GRPC_ALLOW = "Store=gateway"
DEFAULT_ALLOWLIST = PeerAllowlist.parse(DEFAULT_GRPC_ALLOW)


@dataclass(frozen=True)
class IngestConfig:
    kafka_bootstrap: str
    topic_prefix: str
    group_id: str
    crypto_target: str
    grpc_bind: str
    max_instance_bytes: int
    store_max_bytes: int
    seal_piece_bytes: int
    seal_deadline_s: int
    # None only under the explicit development opt-out (dicomsafe.common.tls).
    tls: TlsConfig | None = None
    grpc_allow: PeerAllowlist = DEFAULT_ALLOWLIST

    @classmethod
    def from_env(cls) -> IngestConfig:
        return cls(
            kafka_bootstrap=env_str("KAFKA_BOOTSTRAP"),
            topic_prefix=env_opt("KAFKA_TOPIC_PREFIX"),
            group_id=env_str("INGEST_GROUP_ID", "dicomsafe-ingest"),
            crypto_target=env_str("INGEST_CRYPTO_TARGET", "127.0.0.1:50051"),
            grpc_bind=env_str("INGEST_GRPC_BIND", "127.0.0.1:50055"),
            max_instance_bytes=env_int("INGEST_MAX_INSTANCE_BYTES", DEFAULT_MAX_RECORD_BYTES),
            # Instances stored over gRPC (STOW-RS) are not bound by the broker's record size.
            store_max_bytes=env_int("INGEST_STORE_MAX_BYTES", 256 * 1024 * 1024),
            seal_piece_bytes=env_int("INGEST_SEAL_PIECE_BYTES", 1024 * 1024),
            seal_deadline_s=env_int("INGEST_SEAL_DEADLINE_S", 120),
            tls=tls_from_env(),
            grpc_allow=PeerAllowlist.parse(env_str("INGEST_GRPC_ALLOW", DEFAULT_GRPC_ALLOW)),
        )
