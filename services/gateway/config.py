from __future__ import annotations

from dataclasses import dataclass

from dicomsafe.common.config import env_int, env_opt, env_str
from dicomsafe.common.peer_auth import PeerAllowlist
from dicomsafe.common.tls import TlsConfig, tls_from_env

# Retrieval is for the trusted front ends (viewer back-ends) holding a "viewer" certificate;
# the user's own rights come from the access token, checked by authz.
DEFAULT_GRPC_ALLOW = "Retrieve=viewer"
DEFAULT_ALLOWLIST = PeerAllowlist.parse(DEFAULT_GRPC_ALLOW)


@dataclass(frozen=True)
class GatewayConfig:
    grpc_bind: str
    kafka_bootstrap: str
    topic_prefix: str
    authz_target: str
    crypto_target: str
    call_deadline_s: int
    # None only under the explicit development opt-out (dicomsafe.common.tls).
    tls: TlsConfig | None = None
    grpc_allow: PeerAllowlist = DEFAULT_ALLOWLIST

    @classmethod
    def from_env(cls) -> GatewayConfig:
        return cls(
            grpc_bind=env_str("GATEWAY_GRPC_BIND", "127.0.0.1:50054"),
            kafka_bootstrap=env_str("KAFKA_BOOTSTRAP"),
            topic_prefix=env_opt("KAFKA_TOPIC_PREFIX"),
            authz_target=env_str("GATEWAY_AUTHZ_TARGET", "127.0.0.1:50052"),
            crypto_target=env_str("GATEWAY_CRYPTO_TARGET", "127.0.0.1:50051"),
            call_deadline_s=env_int("GATEWAY_CALL_DEADLINE_S", 60),
            tls=tls_from_env(),
            grpc_allow=PeerAllowlist.parse(env_str("GATEWAY_GRPC_ALLOW", DEFAULT_GRPC_ALLOW)),
        )
