"""The whole stack as the benches run it (every service a process, production settings) and
the CPU time it spends, servers under it included."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dicomsafe.common.kafka import Topics, ensure_topics, topic_specs
from tools import infra
from tools.bench.process_cpu import cpu_seconds
from tools.oidc_issuer import LocalIssuer, running_issuer
from tools.stack import Stack, StackSettings, free_base_port


@contextmanager
def running_stack(
    kafka: str,
    vault_addr: str,
    vault_token: str,
    mongodb_uri: str,
    work: Path,
    name: str,
    dimse_peers_file: Path | None = None,
) -> Iterator[tuple[Stack, LocalIssuer]]:
    """A started stack on topics and databases of its own (``name`` prefixes them), stopped after."""
    with running_issuer() as idp:
        unique = uuid.uuid4().hex[:8]
        topics = Topics(prefix=f"{name}{unique}.")
        asyncio.run(ensure_topics(kafka, topic_specs(topics, partitions=3)))
        stack = Stack(
            StackSettings(
                kafka_bootstrap=kafka,
                vault_addr=vault_addr,
                mongodb_uri=mongodb_uri,
                vault_admin_token=vault_token,
                work_dir=work / "stack",
                topic_prefix=topics.prefix,
                base_port=free_base_port(),
                audit_db=f"bench_audit_{unique}",
                authz_db=f"bench_authz_{unique}",
                index_db=f"bench_index_{unique}",
                oidc_issuer=idp.url,
                oidc_jwks_url=idp.jwks_url,
                dimse_peers_file=dimse_peers_file,
            )
        )
        stack.start()
        try:
            yield stack, idp
        finally:
            stack.stop()


def _process_cpu_s(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except OSError:
        return 0.0  # ended between listing and reading


def stack_cpu_seconds(stack: Stack) -> dict[str, float]:
    """CPU time of each service and, when they run here, of the servers under them: on a
    two-core machine the broker, Vault and the MongoDB-wire server share the cores too."""
    out = {name: _process_cpu_s(proc.pid) for name, proc in stack.processes.items()}
    for server in infra.ALL:
        pids = infra.server_pids(server)
        if pids:
            out[server] = sum(map(_process_cpu_s, pids))
    return out
