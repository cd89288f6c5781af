"""docker-compose.yml: valid against the Compose specification schema (vendored in the
check-jsonschema package, so offline), and its commands and environment match what the
services' configuration code actually reads."""

from __future__ import annotations

import ast
import copy
import functools
import json
import re
import subprocess
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from services.audit.provision import WRITER_ACTIONS
from tests.unit.test_deploy_env import REPO, SERVICES, config_class, env_spec, environment

COMPOSE = REPO / "docker-compose.yml"
BIND = {
    "ingest": "INGEST_GRPC_BIND",
    "crypto": "CRYPTO_GRPC_BIND",
    "authz": "AUTHZ_GRPC_BIND",
    "audit": "AUDIT_GRPC_BIND",
    "gateway": "GATEWAY_GRPC_BIND",
}


@functools.cache
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))  # resolves <<: merge keys
    return doc


@functools.cache
def compose_schema() -> dict[str, Any]:
    text = (files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def schema_errors(doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(compose_schema(), format_checker=jsonschema.FormatChecker())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def service(name: str) -> dict[str, Any]:
    svc: dict[str, Any] = compose()["services"][name]
    return svc


def setup_script() -> str:
    command = service("setup")["command"]
    return str(command[0] if isinstance(command, list) else command)


def test_compose_file_validates_against_the_compose_spec() -> None:
    assert compose_schema()["title"] == "Compose Specification"
    assert schema_errors(compose()) == []


def test_the_schema_catches_mistakes() -> None:
    broken = copy.deepcopy(compose())
    broken["services"]["crypto"]["healthcheck"]["intervall"] = "5s"
    broken["services"]["authz"]["depends_on"] = {"setup": {"condition": "service_done"}}
    errors = schema_errors(broken)
    assert any("intervall" in e for e in errors)
    assert any("service_done" in e for e in errors)


def test_official_images_pinned() -> None:
    images = {name: svc.get("image", "") for name, svc in compose()["services"].items()}
    assert images["kafka"].startswith("apache/kafka:")
    assert images["vault"].startswith("openbao/openbao:")
    assert images["mongo"].startswith("mongo:")
    assert images["s3"].startswith("chrislusf/seaweedfs:")
    for name in ("kafka", "vault", "mongo"):
        assert not images[name].endswith(":latest") and ":" in images[name], name
    kafka = service("kafka")["environment"]
    assert "broker,controller" in kafka["KAFKA_PROCESS_ROLES"], "KRaft, no ZooKeeper"
    assert kafka["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false", "topics come from tools.topics with explicit partitions"


@pytest.mark.parametrize("name", SERVICES)
def test_each_service_runs_its_module(name: str) -> None:
    svc = service(name)
    assert svc["image"] == service("setup")["image"], "one image for every service"
    assert svc["command"] == [f"services.{name}"]
    assert (REPO / "services" / name / "__main__.py").exists()


@pytest.mark.parametrize("name", SERVICES)
def test_environment_matches_what_the_service_reads(name: str, tmp_path: Path) -> None:
    env = {k: str(v) for k, v in service(name)["environment"].items()}
    spec = env_spec(name)
    assert set(env) <= spec.readable, f"{name} sets variables it never reads: {set(env) - spec.readable}"
    assert spec.required <= set(env), f"{name} lacks required {spec.required - set(env)}"
    with environment(env, tmp_path):
        config_class(name).from_env()  # raises on a missing or malformed setting


@pytest.mark.parametrize("name", SERVICES)
def test_health_check_asks_the_grpc_health_service_on_the_health_port(name: str) -> None:
    svc = service(name)
    # The service's own port wants a client certificate; the plaintext health-only port is
    # for the health check, on loopback only.
    assert str(svc["environment"][BIND[name]]).startswith("0.0.0.0:")
    health_bind = str(svc["environment"]["GRPC_HEALTH_BIND"])
    assert health_bind.startswith("127.0.0.1:")
    port = health_bind.rpartition(":")[2]
    test = svc["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    code = test[3]
    ast.parse(code)  # valid Python
    assert "grpc_health.v1" in code and "HealthCheckResponse.SERVING" in code
    assert f"'127.0.0.1:{port}'" in code
    # the health-checking package is a runtime dependency of the image, not a dev extra
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    deps = pyproject.split("[project.optional-dependencies]")[0]
    assert '"grpcio-health-checking==' in deps


@pytest.mark.parametrize("name", SERVICES)
def test_service_containers_are_locked_down(name: str) -> None:
    svc = service(name)
    assert svc["read_only"] is True
    assert svc["tmpfs"] == ["/tmp"]
    assert svc["cap_drop"] == ["ALL"] and "cap_add" not in svc
    assert "no-new-privileges:true" in svc["security_opt"]
    assert not svc.get("privileged") and "user" not in svc, "runs as the image's uid 10001"
    for volume in svc.get("volumes", []):
        _source, _target, *mode = volume.split(":")
        # nothing is writable: identities are read-only, sealed objects go to S3
        assert mode == ["ro"], volume
    assert "healthcheck" in svc


def test_files_named_by_the_environment_are_provisioned_and_mounted() -> None:
    script = setup_script()
    for name in SERVICES:
        svc = service(name)
        targets = [v.split(":")[1] for v in svc.get("volumes", [])]
        readable = env_spec(name).readable
        for key, value in svc["environment"].items():
            if not key.endswith("_FILE") or key.removesuffix("_FILE") not in readable:
                continue  # not a secret read through env_secret (e.g. AUTHZ_POLICY_FILE ships in the image)
            path = Path(str(value))
            assert any(str(path).startswith(t + "/") for t in targets), f"{name}: {key} is not on a volume"
            # written by the setup job: literally, or as role-id/secret-id in a tools.vault_setup --out folder
            written = str(path) in script or (path.name in {"role-id", "secret-id"} and str(path.parent) in script)
            assert written, f"{name}: nothing provisions {key}={value}"


def test_setup_job_creates_topics_certificates_vault_identities_and_the_audit_user() -> None:
    script = setup_script()
    modules = re.findall(r"python -m ([\w.]+)", script)
    assert modules == [
        "tools.topics",
        "tools.pki",
        "tools.vault_setup",
        "services.audit",
        "services.gateway.provision",
    ]
    for module in modules:
        path = REPO / Path(*module.split("."))
        assert path.with_suffix(".py").exists() or (path / "__main__.py").exists(), module
    assert "--partitions 6" in script
    assert "services.audit provision" in script
    # the audit writer may only insert and find (plus read index metadata to check it at start)
    assert set(WRITER_ACTIONS) <= {"insert", "find", "listIndexes", "listCollections"}
    assert {"update", "remove", "delete", "dropCollection"}.isdisjoint(WRITER_ACTIONS)
    depends = service("setup")["depends_on"]
    assert {k: v["condition"] for k, v in depends.items()} == {
        "kafka": "service_healthy",
        "vault": "service_healthy",
        "mongo": "service_healthy",
    }
    for name in SERVICES:
        chain = service(name)["depends_on"]
        assert "setup" in chain or {"crypto"} <= set(chain), f"{name} must start after the setup job"
    # shell syntax, after Compose's interpolation ($$ → $): parsed by sh -n, nothing runs
    for name in ("setup", "vault"):
        command = service(name)["command"]
        text = str(command[0] if isinstance(command, list) else command).replace("$$", "$")
        subprocess.run(["sh", "-n", "-c", text], check=True, timeout=10)


def test_mongodb_runs_with_authentication_and_a_scoped_authz_user() -> None:
    mongo = service("mongo")
    assert mongo["environment"]["MONGO_INITDB_ROOT_PASSWORD_FILE"].startswith("/run/dicomsafe-secrets/")
    init_dir = next(v.split(":")[0] for v in mongo["volumes"] if ":/docker-entrypoint-initdb.d" in v)
    scripts = sorted((REPO / init_dir).glob("*.js"))
    assert scripts, "the authz user's init script"
    js = scripts[0].read_text(encoding="utf-8")
    roles = re.findall(r"role:\s*\"(\w+)\",\s*db:\s*\"(\w+)\"", js)
    assert roles == [("readWrite", "dicomsafe_authz")]
    assert 'getSiblingDB("dicomsafe_authz")' in js
    assert "dicomsafe-authz:" in setup_script(), "authz gets a connection string for that user"


def test_no_secret_values_in_the_file() -> None:
    for name, svc in compose()["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if re.search(r"PASSWORD|TOKEN|SECRET", key) and not key.endswith("_FILE"):
                pytest.fail(f"{name}: {key} carries a literal secret")
            assert not re.search(r"://[^/\s@]*:[^/\s@]+@", str(value)), f"{name}: credentials in {key}"


def test_every_dependency_exists() -> None:
    services = compose()["services"]
    volumes = set(compose().get("volumes", {}))
    for name, svc in services.items():
        assert set(svc.get("depends_on", {})) <= set(services), name
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            assert source in volumes or source.startswith("./"), f"{name}: {volume}"
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name}: {source}"


def test_every_service_serves_with_its_own_certificate_from_the_setup_job() -> None:
    script = setup_script()
    for name in SERVICES:
        svc = service(name)
        env = {k: str(v) for k, v in svc["environment"].items()}
        targets = [v.split(":")[1] for v in svc.get("volumes", [])]
        paths = [Path(env[k]) for k in ("TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CA_FILE")]
        for path in paths:
            assert any(str(path).startswith(t + "/") for t in targets), f"{name}: {path} is not on a volume"
            assert f"python -m tools.pki {path.parent} " in script, f"{name}: nothing issues {path}"
        # its own identity (tools.pki names files after the identity), never a peer's
        assert [p.name for p in paths] == [f"{name}.crt", f"{name}.key", "ca.crt"]
        assert "DICOMSAFE_INSECURE_DEV" not in env
