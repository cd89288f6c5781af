from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dicomsafe.common.config import env_int, env_opt, env_secret, env_str
from dicomsafe.common.peer_auth import PeerAllowlist
from dicomsafe.common.tls import TlsConfig, tls_from_env

# Decisions for the gateway (user requests), audit and ops tooling (erasure); grant management
# through the gateway or ops tooling; break-glass only on behalf of a signed-in user.
DEFAULT_GRPC_ALLOW = "Check,CheckMany=gateway,audit,ops; CreateGrant,RevokeGrant=gateway,ops; BreakGlass=gateway"
DEFAULT_ALLOWLIST = PeerAllowlist.parse(DEFAULT_GRPC_ALLOW)


@dataclass(frozen=True)
class AuthzConfig:
    grpc_bind: str
    policy_file: Path
    kafka_bootstrap: str
    topic_prefix: str
    # Without an issuer (development only) subjects are taken on trust from the request.
    oidc_issuer: str = ""
    oidc_audience: str = "dicomsafe"
    oidc_jwks_url: str = ""
    oidc_leeway_s: int = 30
    oidc_mfa_acr: frozenset[str] = frozenset()
    # How long a verified token is remembered (never past its expiry); 0 = verify every time.
    oidc_remember_s: int = 60
    # How often the policy file is checked for changes (a ConfigMap update sends no signal).
    policy_reload_s: int = 10
    # Grants (time-limited access, break-glass) live in MongoDB; without it only the policy
    # file counts and the grant RPCs answer FAILED_PRECONDITION.
    mongodb_uri: str = ""
    mongodb_db: str = "dicomsafe_authz"
    # Longest wait for Kafka to acknowledge a decision's audit event before answering
    # UNAVAILABLE (the caller's own gRPC deadline shortens it further).
    audit_timeout_s: float = 5.0
    # How often ended break-glass grants are looked for, to announce "Emergency Override
    # Stopped" (also those that ended while the service was down). Access itself ends on time
    # regardless: every check compares the grant window with the clock.
    break_glass_sweep_s: float = 5.0
    # Checks read grants from memory, emptied whenever the grants' generation counter moves,
    # which is polled this often: the longest a change on another replica goes unseen. 0 reads
    # the store on every check.
    grant_cache_poll_ms: int = 250
    # None only under the explicit development opt-out (dicomsafe.common.tls).
    tls: TlsConfig | None = None
    grpc_allow: PeerAllowlist = DEFAULT_ALLOWLIST
    # Service identities whose word for a DICOM peer authz takes (the peer is authenticated by
    # its certificate at their DIMSE listener, not by a token).
    dimse_vouchers: frozenset[str] = frozenset({"gateway"})

    @classmethod
    def from_env(cls) -> AuthzConfig:
        return cls(
            grpc_bind=env_str("AUTHZ_GRPC_BIND", "127.0.0.1:50052"),
            policy_file=Path(env_str("AUTHZ_POLICY_FILE", "deploy/policy/policy.toml")),
            kafka_bootstrap=env_str("KAFKA_BOOTSTRAP"),
            topic_prefix=env_opt("KAFKA_TOPIC_PREFIX"),
            oidc_issuer=env_opt("AUTHZ_OIDC_ISSUER"),
            oidc_audience=env_str("AUTHZ_OIDC_AUDIENCE", "dicomsafe"),
            oidc_jwks_url=env_opt("AUTHZ_OIDC_JWKS_URL"),
            oidc_leeway_s=env_int("AUTHZ_OIDC_LEEWAY_S", 30),
            oidc_mfa_acr=frozenset(v for v in env_opt("AUTHZ_OIDC_MFA_ACR").split(",") if v),
            oidc_remember_s=env_int("AUTHZ_OIDC_REMEMBER_S", 60),
            policy_reload_s=env_int("AUTHZ_POLICY_RELOAD_S", 10),
            mongodb_uri=env_secret("AUTHZ_MONGODB_URI") or "",
            mongodb_db=env_str("AUTHZ_MONGODB_DB", "dicomsafe_authz"),
            audit_timeout_s=float(env_int("AUTHZ_AUDIT_TIMEOUT_S", 5)),
            break_glass_sweep_s=float(env_int("AUTHZ_BREAK_GLASS_SWEEP_S", 5)),
            grant_cache_poll_ms=env_int("AUTHZ_GRANT_CACHE_POLL_MS", 250),
            tls=tls_from_env(),
            grpc_allow=PeerAllowlist.parse(env_str("AUTHZ_GRPC_ALLOW", DEFAULT_GRPC_ALLOW)),
            dimse_vouchers=frozenset(
                v.strip() for v in env_str("AUTHZ_DIMSE_VOUCHERS", "gateway").split(",") if v.strip()
            ),
        )
