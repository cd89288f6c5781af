from __future__ import annotations

from dataclasses import dataclass

from dicomsafe.common.config import env_int, env_opt, env_secret, env_str
from dicomsafe.common.peer_auth import PeerAllowlist
from dicomsafe.common.tls import TlsConfig, tls_from_env
from dicomsafe.common.vault import VaultAuth, vault_auth_from_env

# The trail is read by the gateway (on behalf of auditors) and by ops tooling.
DEFAULT_GRPC_ALLOW = "Verify,Query,QueryPage=gateway,ops"
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
    # authz decides who may Query and Verify (audit.read / audit.verify).
    authz_target: str = "127.0.0.1:50052"
    authz_deadline_s: float = 10.0
    # The unusual-pattern rules run every interval over the last window of recorded events
    # and raise alerts on `security.alerts`; interval 0 turns them off.
    alert_interval_s: int = 60
    alert_window_s: int = 3600
    # The hospital's time zone, for the working-hours rule.
    alert_timezone: str = "UTC"
    # The external audit repository (RFC 5424 over TLS 1.3): "" = no forwarding.
    syslog_target: str = ""
    syslog_ca_file: str = ""
    syslog_hostname: str = "dicomsafe-audit"
    syslog_interval_s: int = 5
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
            authz_target=env_str("AUDIT_AUTHZ_TARGET", "127.0.0.1:50052"),
            authz_deadline_s=float(env_int("AUDIT_AUTHZ_DEADLINE_S", 10)),
            alert_interval_s=env_int("AUDIT_ALERT_INTERVAL_S", 60),
            alert_window_s=env_int("AUDIT_ALERT_WINDOW_S", 3600),
            alert_timezone=env_str("AUDIT_ALERT_TIMEZONE", "UTC"),
            syslog_target=env_opt("AUDIT_SYSLOG_TARGET"),
            syslog_ca_file=env_opt("AUDIT_SYSLOG_CA_FILE"),
            syslog_hostname=env_str("AUDIT_SYSLOG_HOSTNAME", "dicomsafe-audit"),
            syslog_interval_s=env_int("AUDIT_SYSLOG_INTERVAL_S", 5),
            tls=tls_from_env() if serving else None,
            grpc_allow=PeerAllowlist.parse(env_str("AUDIT_GRPC_ALLOW", DEFAULT_GRPC_ALLOW)),
        )
