from __future__ import annotations

from dataclasses import dataclass

from dicomsafe.common.config import env_int, env_opt, env_secret, env_str
from dicomsafe.common.peer_auth import PeerAllowlist
from dicomsafe.common.tls import TlsConfig, tls_from_env
from dicomsafe.common.vault import VaultAuth, vault_auth_from_env

# The trail is read by the gateway (on behalf of auditors) and by ops tooling.
DEFAULT_GRPC_ALLOW = "Verify,Query=gateway,ops"
DEFAULT_ALLOWLIST = PeerAllowlist.parse(DEFAULT_GRPC_ALLOW)


@dataclass(frozen=True)
class AuditConfig:
    grpc_bind: str
    kafka_bootstrap: str
    topic_prefix: str
    group_id: str
    mongodb_uri: str
    database: str
    # None only when explicitly disabled (AUDIT_CHECKPOINTS=disabled): then truncation of a
    # chain's tail is not detectable.
    vault: VaultAuth | None = None
    checkpoint_interval_s: int = 30
    # None only under the explicit development opt-out (dicomsafe.common.tls).
    tls: TlsConfig | None = None
    grpc_allow: PeerAllowlist = DEFAULT_ALLOWLIST

    @classmethod
    def from_env(cls, serving: bool = True) -> AuditConfig:
        """``serving=False`` for the command-line tools, which read MongoDB and Vault directly
        and listen on nothing, so need no TLS material."""
        uri = env_secret("MONGODB_URI")
        if not uri:
            raise ValueError("MONGODB_URI (or MONGODB_URI_FILE) is required")
        return cls(
            grpc_bind=env_str("AUDIT_GRPC_BIND", "127.0.0.1:50053"),
            kafka_bootstrap=env_str("KAFKA_BOOTSTRAP"),
            topic_prefix=env_opt("KAFKA_TOPIC_PREFIX"),
            group_id=env_str("AUDIT_GROUP_ID", "dicomsafe-audit"),
            mongodb_uri=uri,
            database=env_str("AUDIT_MONGODB_DB", "dicomsafe_audit"),
            vault=None if env_opt("AUDIT_CHECKPOINTS") == "disabled" else vault_auth_from_env(),
            checkpoint_interval_s=env_int("AUDIT_CHECKPOINT_INTERVAL_S", 30),
            tls=tls_from_env() if serving else None,
            grpc_allow=PeerAllowlist.parse(env_str("AUDIT_GRPC_ALLOW", DEFAULT_GRPC_ALLOW)),
        )
