"""What each service's configuration code reads from the environment, found by parsing it
(helpers for test_deploy_compose.py and test_deploy_k8s.py, and tests of the parser itself).

Shared by the deployment tests (Compose and Kubernetes), so manifests cannot drift from the
code: a variable a manifest sets must be one the service reads, and every variable the
service requires must be set.
"""

from __future__ import annotations

import ast
import importlib
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("ingest", "crypto", "authz", "audit", "gateway")
_READERS = {"env_str", "env_int", "env_opt", "env_secret"}
# Shared plumbing every service runs through (logging, metrics, topic names, gRPC servers).
_COMMON_MODULES = (
    "dicomsafe/common/logs.py",
    "dicomsafe/common/metrics.py",
    "dicomsafe/common/kafka.py",
    "dicomsafe/common/grpc_runtime.py",
)


# Files that are configuration, not secrets, parsed at start: a valid document of their kind.
_PLACEHOLDERS = {"_DIMSE_PEERS_FILE": '{"peers": []}\n'}


@dataclass(frozen=True)
class EnvSpec:
    """The variables a service reads; ``required`` = env_str without a default."""

    readable: frozenset[str]
    required: frozenset[str]


def _const(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _reads(tree: ast.AST, only_functions: set[str] | None = None) -> tuple[set[str], set[str], set[str]]:
    """(readable, required, called names) in a module, or only in the named functions."""
    readable: set[str] = set()
    required: set[str] = set()
    called: set[str] = set()
    roots: list[ast.AST] = [tree]
    if only_functions is not None:
        roots = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name in only_functions]
    for root in roots:
        for node in ast.walk(root):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            fname = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            called.add(fname)
            name = _const(node.args[0]) if node.args else None
            if name is None:
                continue
            if fname in _READERS:
                readable.add(name)
                if fname == "env_secret":
                    readable.add(f"{name}_FILE")
                default = node.args[1] if len(node.args) > 1 else None
                no_default = default is None or (isinstance(default, ast.Constant) and default.value is None)
                if fname == "env_str" and no_default and not node.keywords:
                    required.add(name)
            elif fname == "get" and isinstance(func, ast.Attribute) and ast.unparse(func.value) == "os.environ":
                readable.add(name)
    return readable, required, called


def env_spec(service: str) -> EnvSpec:
    """Parse services/<service>/config.py, plus the dicomsafe.common/storage helpers it calls
    (e.g. vault_auth_from_env) and the shared plumbing every service uses."""
    tree = ast.parse((REPO / "services" / service / "config.py").read_text(encoding="utf-8"))
    readable, required, called = _reads(tree)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith(("dicomsafe.common.", "dicomsafe.storage."))
        ):
            helpers = {a.name for a in node.names if a.name in called and a.name not in _READERS}
            if helpers:
                path = REPO / (node.module.replace(".", "/") + ".py")
                helper_tree = ast.parse(path.read_text(encoding="utf-8"))
                # A helper may call the module's other helpers (store_from_env -> s3_from_env).
                local = {n.name for n in ast.walk(helper_tree) if isinstance(n, ast.FunctionDef)}
                while True:
                    _, _, inner = _reads(helper_tree, helpers)
                    if not (inner & local) - helpers:
                        break
                    helpers |= inner & local
                r, q, _ = _reads(helper_tree, helpers)
                readable |= r
                required |= q
    for module in _COMMON_MODULES:
        r, _, _ = _reads(ast.parse((REPO / module).read_text(encoding="utf-8")))
        readable |= r
    return EnvSpec(frozenset(readable), frozenset(required))


def tool_env_spec(tool: str) -> frozenset[str]:
    """What a site job (``tools/<tool>.py``) may read: its own module, the store settings it
    shares with the services (dicomsafe/storage/store_env.py) and Kafka's client settings."""
    readable: set[str] = set()
    for path, functions in (
        (f"tools/{tool}.py", None),
        ("dicomsafe/storage/store_env.py", None),
        ("dicomsafe/common/kafka.py", None),
    ):
        r, _, _ = _reads(ast.parse((REPO / path).read_text(encoding="utf-8")), functions)
        readable |= r
    return frozenset(readable)


def config_class(service: str) -> Any:
    """The service's configuration class (the one with ``from_env``)."""
    module = importlib.import_module(f"services.{service}.config")
    for value in vars(module).values():
        if isinstance(value, type) and value.__module__ == module.__name__ and hasattr(value, "from_env"):
            return value
    raise AssertionError(f"services/{service}/config.py has no class with from_env")


@contextmanager
def environment(env: Mapping[str, str], secret_dir: Path) -> Iterator[None]:
    """Exactly ``env`` as the process environment; ``*_FILE`` paths (in-container paths) are
    redirected to a readable dummy file, since the secret itself is not the point here."""
    saved = dict(os.environ)
    os.environ.clear()
    for key, value in env.items():
        if key.endswith("_FILE"):
            dummy = secret_dir / key
            content = next((c for suffix, c in _PLACEHOLDERS.items() if key.endswith(suffix)), "placeholder-secret\n")
            dummy.write_text(content, encoding="utf-8")
            value = str(dummy)
        os.environ[key] = value
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# --- the parser itself: it must see what the code demonstrably reads ---------------------------


def test_every_service_requires_kafka_bootstrap() -> None:
    for service in SERVICES:
        spec = env_spec(service)
        assert "KAFKA_BOOTSTRAP" in spec.required, service
        # shared plumbing, read outside config.py
        assert {"LOG_LEVEL", "METRICS_BIND", "KAFKA_TOPIC_PREFIX"} <= spec.readable, service


def test_secrets_are_readable_from_files_and_helpers_are_followed() -> None:
    audit = env_spec("audit")
    # env_secret("MONGODB_URI") in config.py; VAULT_* through vault_auth_from_env in dicomsafe.common.vault
    assert {"MONGODB_URI", "MONGODB_URI_FILE", "VAULT_ROLE_ID_FILE", "VAULT_SECRET_ID_FILE"} <= audit.readable
    assert "VAULT_ADDR" in audit.required
    crypto = env_spec("crypto")
    assert {"VAULT_TOKEN_FILE", "VAULT_CACERT_PATH_FILE", "CRYPTO_STORE_DIR"} <= crypto.readable
    assert "VAULT_ADDR" in crypto.required
    # defaults are not requirements
    assert "CRYPTO_GRPC_BIND" not in crypto.required


def test_unknown_names_are_not_readable() -> None:
    assert "GATEWAY_CRYPTO_TARGET" not in env_spec("ingest").readable
    assert "INGEST_CRYPTO_TARGET" not in env_spec("gateway").readable
