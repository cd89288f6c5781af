from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dicomsafe.common.config import env_opt, env_str


@dataclass(frozen=True)
class AuthzConfig:
    grpc_bind: str
    policy_file: Path
    kafka_bootstrap: str
    topic_prefix: str

    @classmethod
    def from_env(cls) -> AuthzConfig:
        return cls(
            grpc_bind=env_str("AUTHZ_GRPC_BIND", "127.0.0.1:50052"),
            policy_file=Path(env_str("AUTHZ_POLICY_FILE", "deploy/policy/policy.toml")),
            kafka_bootstrap=env_str("KAFKA_BOOTSTRAP"),
            topic_prefix=env_opt("KAFKA_TOPIC_PREFIX"),
        )
