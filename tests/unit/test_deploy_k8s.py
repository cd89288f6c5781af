"""The Kubernetes manifests: render every overlay with kustomize, validate every object against
the Kubernetes OpenAPI schemas offline (kubernetes-validate ships them), and check the security,
scaling and configuration properties the deployment promises."""

from __future__ import annotations

import functools
import ipaddress
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]  # ships no type information
import pytest
import yaml

from dicomsafe.common.kafka import Topics, topic_specs
from dicomsafe.storage.store_env import archive_from_env
from services.authz.policy import load_policy
from tests.unit.test_deploy_env import REPO, SERVICES, config_class, env_spec, environment, tool_env_spec
from tools.backup import site_from_env
from tools.tiering import load_policy as load_tiering_policy

K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("dev", "production")
# Oldest Kubernetes the manifests target (gRPC probes GA 1.27, native sidecars on by default
# 1.29) and the newest schema kubernetes-validate ships.
K8S_VERSIONS = ("1.29", "1.37")
CRDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("kafka.strimzi.io/v1beta2", "KafkaTopic"),
    ("kafka.strimzi.io/v1beta2", "KafkaUser"),
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
}
GRPC_BIND = {
    "ingest": "INGEST_GRPC_BIND",
    "crypto": "CRYPTO_GRPC_BIND",
    "authz": "AUTHZ_GRPC_BIND",
    "audit": "AUDIT_GRPC_BIND",
    "gateway": "GATEWAY_GRPC_BIND",
}
Obj = dict[str, Any]

KUBECTL = shutil.which("kubectl")
pytestmark = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl not installed: `kubectl kustomize` renders the overlays"
)


@functools.cache
def render(overlay: str) -> tuple[Obj, ...]:
    assert KUBECTL is not None
    out = subprocess.run(
        [KUBECTL, "kustomize", str(K8S / "overlays" / overlay)], check=True, capture_output=True, text=True, timeout=120
    ).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


@pytest.fixture(params=OVERLAYS)
def objects(request: pytest.FixtureRequest) -> tuple[Obj, ...]:
    return render(request.param)


def of_kind(objs: tuple[Obj, ...], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def named(objs: tuple[Obj, ...], kind: str, name: str) -> Obj:
    found = [o for o in of_kind(objs, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_templates(objs: tuple[Obj, ...]) -> Iterator[tuple[str, Obj]]:
    """(workload name, pod template) of every Deployment and CronJob."""
    for o in objs:
        if o["kind"] == "Deployment":
            yield o["metadata"]["name"], o["spec"]["template"]
        elif o["kind"] == "CronJob":
            yield o["metadata"]["name"], o["spec"]["jobTemplate"]["spec"]["template"]


def all_containers(pod: Obj) -> list[Obj]:
    spec = pod["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def main_container(name: str, pod: Obj) -> Obj:
    containers: list[Obj] = pod["spec"]["containers"]
    assert len(containers) == 1, f"{name}: one application container expected"
    return containers[0]


def service_of(workload: str) -> str:
    return "audit" if workload == "audit-verify" else workload


# Scheduled site jobs (site-jobs.yaml) -> the tool each runs.
SITE_JOBS = {"site-backup": "backup", "tiering": "tiering"}


def container_env(container: Obj, objs: tuple[Obj, ...]) -> dict[str, str]:
    """The container's environment as the kubelet would build it (ConfigMaps resolved)."""
    env: dict[str, str] = {}
    config_maps = {o["metadata"]["name"]: o.get("data", {}) for o in of_kind(objs, "ConfigMap")}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        assert ref in config_maps, f"envFrom names a ConfigMap that is not rendered: {ref}"
        env.update(config_maps[ref])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            key = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = config_maps[key["name"]][key["key"]]
    return env


# --- rendering and schemas -----------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_service(overlay: str) -> None:
    objs = render(overlay)
    for service in SERVICES:
        for kind in ("Deployment", "Service", "ServiceAccount", "PodDisruptionBudget"):
            named(objs, kind, service)
    assert sorted(o["metadata"]["name"] for o in of_kind(objs, "HorizontalPodAutoscaler")) == [
        "authz",
        "crypto",
        "gateway",
    ]
    # Sealed objects live in S3: no volume ties crypto (or anything) to a node.
    assert of_kind(objs, "PersistentVolumeClaim") == []
    crypto = named(objs, "Deployment", "crypto")["spec"]["template"]["spec"]["containers"][0]
    assert container_env(crypto, objs)["CRYPTO_STORE_URL"].startswith("s3://")
    namespace = of_kind(objs, "Namespace")
    assert len(namespace) == 1
    labels = namespace[0]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    # every namespaced object lands in the overlay's namespace
    ns = namespace[0]["metadata"]["name"]
    assert {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"} == {ns}


def test_every_object_validates_against_the_kubernetes_schemas(objects: tuple[Obj, ...]) -> None:
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CRDS:
            continue  # custom resources: checked structurally below
        for version in K8S_VERSIONS:
            # strict: unknown fields (typos) fail too
            kubernetes_validate.validate(obj, version, strict=True)


def test_the_schema_validation_rejects_mistakes() -> None:
    deployment = named(render("dev"), "Deployment", "crypto")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grcp": {"port": 50051}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_custom_resources_are_well_formed() -> None:
    objs = render("production")
    kinds = {(o["apiVersion"], o["kind"]) for o in objs} & CRDS
    assert kinds == CRDS, "production enables every optional component"
    for so in of_kind(objs, "ScaledObject"):
        assert named(objs, "Deployment", so["spec"]["scaleTargetRef"]["name"])
        assert so["spec"]["triggers"][0]["type"] == "kafka"
    for cert in of_kind(objs, "Certificate"):
        assert cert["spec"]["issuerRef"]["name"] in {o["metadata"]["name"] for o in of_kind(objs, "Issuer")}
        assert cert["spec"]["privateKey"]["rotationPolicy"] == "Always"
        assert cert["spec"]["secretName"]
        identity = cert["metadata"]["labels"]["app.kubernetes.io/name"]
        if cert["metadata"]["name"] != f"{identity}-tls":
            assert "uris" not in cert["spec"]  # a listener's certificate for users (gateway-https)
            continue
        # one workload identity per certificate, the one the peer allowlists name
        assert cert["spec"]["uris"] == [f"spiffe://dicomsafe/{identity}"]
        assert bool(cert["spec"].get("dnsNames")) == (identity in SERVICES), identity
    for obj in [*of_kind(objs, "KafkaTopic"), *of_kind(objs, "KafkaUser")]:
        assert obj["metadata"]["labels"]["strimzi.io/cluster"] == "dicomsafe"


def test_custom_resources_are_optional_components() -> None:
    dev = render("dev")
    assert not {(o["apiVersion"], o["kind"]) for o in dev} & CRDS, "dev must run without KEDA/Strimzi/cert-manager"


# --- security ------------------------------------------------------------------------------------


def test_pods_meet_pod_security_restricted(objects: tuple[Obj, ...]) -> None:
    templates = list(pod_templates(objects))
    assert {service_of(n) for n, _ in templates} == {*SERVICES, *SITE_JOBS}
    for name, pod in templates:
        spec = pod["spec"]
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, name
        assert pod_sc["runAsUser"] != 0, name
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        for forbidden in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(forbidden), f"{name}: {forbidden}"
        assert all("hostPath" not in v for v in spec.get("volumes", [])), name
        for c in all_containers(pod):
            where = f"{name}/{c['name']}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc.get("runAsNonRoot", pod_sc["runAsNonRoot"]) is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert not sc["capabilities"].get("add"), where
            assert not sc.get("privileged"), where
            assert sc.get("seccompProfile", pod_sc["seccompProfile"])["type"] == "RuntimeDefault", where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{where}: resources.{kind}"


def test_writable_paths_are_volumes(objects: tuple[Obj, ...]) -> None:
    """Read-only root: the application writes only to /tmp (memory); sealed objects go to S3."""
    for name, pod in pod_templates(objects):
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        app = main_container(name, pod)
        writable = {m["mountPath"] for m in app["volumeMounts"] if not m.get("readOnly")}
        assert writable == {"/tmp"}, name
        tmp = next(m for m in app["volumeMounts"] if m["mountPath"] == "/tmp")
        assert volumes[tmp["name"]]["emptyDir"]["medium"] == "Memory", f"{name}: plaintext must not reach a disk"


def test_long_running_containers_have_grpc_probes_on_their_port(objects: tuple[Obj, ...]) -> None:
    for deployment in of_kind(objects, "Deployment"):
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]
        app = main_container(name, pod)
        env = container_env(app, objects)
        port = int(env[GRPC_BIND[name]].rpartition(":")[2])
        # The service port wants a client certificate, which the kubelet's gRPC probe cannot
        # present: probes ask the plaintext health-only port.
        probe_port = int(env["GRPC_HEALTH_BIND"].rpartition(":")[2])
        assert probe_port != port, name
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert app[probe]["grpc"]["port"] == probe_port, f"{name}: {probe}"
        assert {port, probe_port} <= {p["containerPort"] for p in app["ports"]}, name
        for sidecar in pod["spec"].get("initContainers", []):
            # native sidecars: the app starts only once the sidecar is up
            assert sidecar["restartPolicy"] == "Always", f"{name}/{sidecar['name']}"
            assert "startupProbe" in sidecar, f"{name}/{sidecar['name']}"


def _selects(selector: Obj, labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


def _pods(objs: tuple[Obj, ...]) -> dict[str, dict[str, str]]:
    return {name: pod["metadata"]["labels"] for name, pod in pod_templates(objs)}


def test_default_deny_selects_every_pod(objects: tuple[Obj, ...]) -> None:
    policies = of_kind(objects, "NetworkPolicy")
    deny = [
        p
        for p in policies
        if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress") and not p["spec"].get("egress")
    ]
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    for name, labels in _pods(objects).items():
        own = [p for p in policies if p["spec"]["podSelector"] and _selects(p["spec"]["podSelector"], labels)]
        assert own, f"{name}: no NetworkPolicy of its own states what it may do"
        assert any("Egress" in p["spec"]["policyTypes"] for p in own), name


def _peer_pods(peers: list[Obj], pods: dict[str, dict[str, str]], ns: str) -> set[str]:
    """Pods of our namespace a rule's peers admit (ipBlocks are checked separately)."""
    hit: set[str] = set()
    for peer in peers:
        if "ipBlock" in peer:
            continue
        ns_sel = peer.get("namespaceSelector")
        if ns_sel is not None and not _selects(ns_sel, {"kubernetes.io/metadata.name": ns}):
            continue
        pod_sel = peer.get("podSelector", {})
        hit |= {name for name, labels in pods.items() if _selects(pod_sel, labels)}
    return hit


def _allowed(policies: list[Obj], pod: dict[str, str], direction: str, peer: str, port: int, **ctx: Any) -> bool:
    key = "from" if direction == "ingress" else "to"
    for p in policies:
        if not _selects(p["spec"]["podSelector"], pod):
            continue
        for rule in p["spec"].get(direction, []):
            ports = {pt["port"] for pt in rule.get("ports", [])}
            if (not ports or port in ports) and peer in _peer_pods(rule.get(key, []), ctx["pods"], ctx["ns"]):
                return True
    return False


def test_only_the_architecture_paths_are_open_between_services(objects: tuple[Obj, ...]) -> None:
    policies = of_kind(objects, "NetworkPolicy")
    pods = _pods(objects)
    ns = of_kind(objects, "Namespace")[0]["metadata"]["name"]
    ports = {50051: "crypto", 50052: "authz", 50053: "audit", 50054: "gateway", 50055: "ingest", 9090: "metrics"}
    open_paths = set()
    for src in pods:
        for dst in pods:
            for port in ports:
                if _allowed(policies, pods[src], "egress", dst, port, pods=pods, ns=ns) and _allowed(
                    policies, pods[dst], "ingress", src, port, pods=pods, ns=ns
                ):
                    open_paths.add((src, dst, port))
    # ARCHITECTURE.md: ingest → crypto (seal keys); gateway → authz (Check), gateway → crypto
    # (seal keys for STOW-RS, Open); audit → authz (Check: who may read the trail). No one calls
    # ingest: STOW-RS seals in the gateway, where its bytes are.
    assert open_paths == {
        ("ingest", "crypto", 50051),
        ("gateway", "crypto", 50051),
        ("gateway", "authz", 50052),
        ("audit", "authz", 50052),
    }


def _egress_namespaces(policies: list[Obj], labels: dict[str, str]) -> set[tuple[str, int]]:
    reach = set()
    for p in policies:
        if not _selects(p["spec"]["podSelector"], labels):
            continue
        for rule in p["spec"].get("egress", []):
            for peer in rule.get("to", []):
                ns = peer.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
                if ns:
                    reach |= {(ns, pt["port"]) for pt in rule.get("ports", [])}
    return reach


def test_only_the_identity_holders_reach_vault_and_mongodb(objects: tuple[Obj, ...]) -> None:
    policies = of_kind(objects, "NetworkPolicy")
    for name, labels in _pods(objects).items():
        reach = _egress_namespaces(policies, labels)
        assert (("vault", 8200) in reach) == (name in {"crypto", "audit", "audit-verify"}), name
        mongo_users = {"authz", "audit", "audit-verify", "gateway", *SITE_JOBS}
        assert (("mongodb", 27017) in reach) == (name in mongo_users), name
        assert (("kafka", 9092) in reach) == (name in {*SERVICES, "tiering"}), name
        # The sealers (ingest, the gateway) put into the store; crypto reads it; the jobs move it.
        assert (("s3", 8333) in reach) == (name in {"crypto", "ingest", "gateway", *SITE_JOBS}), name


def test_ip_blocks_never_cover_private_ranges(objects: tuple[Obj, ...]) -> None:
    private = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")]
    for p in of_kind(objects, "NetworkPolicy"):
        for rule in [*p["spec"].get("ingress", []), *p["spec"].get("egress", [])]:
            for peer in [*rule.get("from", []), *rule.get("to", [])]:
                if "ipBlock" in peer:
                    excepted = [ipaddress.ip_network(e) for e in peer["ipBlock"].get("except", [])]
                    block = ipaddress.ip_network(peer["ipBlock"]["cidr"])
                    for net in private:
                        if block.overlaps(net):
                            assert any(net.subnet_of(e) for e in excepted), f"{p['metadata']['name']} reaches {net}"  # type: ignore[arg-type]


# --- identities ----------------------------------------------------------------------------------


def test_vault_identities_use_kubernetes_auth_through_the_proxy(objects: tuple[Obj, ...]) -> None:
    config_maps = {o["metadata"]["name"]: o.get("data", {}) for o in of_kind(objects, "ConfigMap")}
    for name, pod in pod_templates(objects):
        projected = [
            s["serviceAccountToken"]
            for v in pod["spec"]["volumes"]
            for s in v.get("projected", {}).get("sources", [])
            if "serviceAccountToken" in s
        ]
        env = container_env(main_container(name, pod), objects)
        if service_of(name) not in {"crypto", "audit"}:
            assert not projected and "VAULT_ADDR" not in env, f"{name} must hold no Vault identity"
            continue
        assert [t["audience"] for t in projected] == ["vault"], name
        assert all(t["expirationSeconds"] <= 3600 for t in projected), name
        assert env["VAULT_ADDR"] == "http://127.0.0.1:8100", name
        assert "VAULT_TOKEN_FILE" in env and "VAULT_SECRET_ID_FILE" not in env, name
        proxy_cm = next(v["configMap"]["name"] for v in pod["spec"]["volumes"] if v["name"] == "vault-proxy-config")
        hcl = config_maps[proxy_cm]["proxy.hcl"]
        assert f'role       = "dicomsafe-{service_of(name)}"' in hcl, name
        assert 'use_auto_auth_token = "force"' in hcl
        assert re.search(r'address\s*=\s*"127\.0\.0\.1:8100"', hcl), "the proxy must listen on loopback only"


def test_vault_uses_tls_in_production() -> None:
    for cm in of_kind(render("production"), "ConfigMap"):
        if "proxy.hcl" in cm.get("data", {}):
            assert 'address = "https://' in cm["data"]["proxy.hcl"]
            assert "ca_cert" in cm["data"]["proxy.hcl"]


# --- configuration matches the code --------------------------------------------------------------


def test_environment_matches_what_each_service_reads(objects: tuple[Obj, ...], tmp_path: Path) -> None:
    for name, pod in pod_templates(objects):
        if name in SITE_JOBS:
            continue  # test_site_jobs_run_the_installed_tools_with_what_they_read
        service = service_of(name)
        app = main_container(name, pod)
        env = container_env(app, objects)
        spec = env_spec(service)
        assert set(env) <= spec.readable, f"{name} sets variables {service} never reads: {set(env) - spec.readable}"
        assert spec.required <= set(env), f"{name} lacks required {spec.required - set(env)}"
        with environment(env, tmp_path):
            if app["args"][1:]:  # a command-line tool of the service (audit verify): serves nothing
                config_class(service).from_env(serving=False)
            else:
                config_class(service).from_env()  # raises on a missing or malformed setting
        assert app["args"][0] == f"services.{service}"
        assert (REPO / "services" / service / "__main__.py").exists()


def test_site_jobs_run_the_installed_tools_with_what_they_read(objects: tuple[Obj, ...], tmp_path: Path) -> None:
    crypto_env = container_env(
        main_container("crypto", named(objects, "Deployment", "crypto")["spec"]["template"]), objects
    )
    for name, tool in SITE_JOBS.items():
        app = main_container(name, named(objects, "CronJob", name)["spec"]["jobTemplate"]["spec"]["template"])
        env = container_env(app, objects)
        readable = tool_env_spec(tool)
        assert set(env) <= readable, f"{name} sets variables {tool} never reads: {set(env) - readable}"
        assert app["args"][:2] == ["tools.cli", "tier" if tool == "tiering" else tool], name
        assert "MONGODB_URI_FILE" in env and "MONGODB_URI" not in env, f"{name}: the URI is a secret, from a file"
        # The same stores as crypto's, so the job sees the objects crypto wrote.
        for key in ("CRYPTO_STORE_URL", "CRYPTO_ARCHIVE_STORE_URL", "S3_ENDPOINT_URL"):
            assert env[key] == crypto_env[key], f"{name}: {key}"
        # Never crypto's S3 key: each job has its own, scoped to what it does.
        secrets = {v["name"]: v["secret"]["secretName"] for v in app_volumes(name, objects) if "secret" in v}
        assert "crypto-s3" not in secrets.values(), name
        with environment(env, tmp_path):
            archive = archive_from_env()
            assert archive is not None and archive.retention_days > 0, f"{name}: the archive tier is retained"
            if tool == "backup":
                site = site_from_env()
                assert set(site.databases.values()) == {"dicomsafe_index", "dicomsafe_audit", "dicomsafe_authz"}
            else:
                assert env["KAFKA_BOOTSTRAP"]  # each move is audited
    policy = named(objects, "CronJob", "tiering")["spec"]["jobTemplate"]["spec"]["template"]
    assert main_container("tiering", policy)["args"][-1] == "/etc/dicomsafe/tiering/tiering.toml"


def app_volumes(name: str, objects: tuple[Obj, ...]) -> list[Obj]:
    volumes: list[Obj] = named(objects, "CronJob", name)["spec"]["jobTemplate"]["spec"]["template"]["spec"]["volumes"]
    return volumes


def test_tiering_policy_copy_matches_the_repository_policy() -> None:
    copy = (K8S / "base" / "tiering-policy.toml").read_text(encoding="utf-8")
    assert copy == (REPO / "deploy" / "policy" / "tiering.toml").read_text(encoding="utf-8")
    load_tiering_policy(K8S / "base" / "tiering-policy.toml")  # and it loads


def test_files_named_by_the_environment_are_mounted(objects: tuple[Obj, ...]) -> None:
    for name, pod in pod_templates(objects):
        app = main_container(name, pod)
        mounts = [m["mountPath"] for m in app["volumeMounts"]]
        for key, value in container_env(app, objects).items():
            if key.endswith(("_FILE", "_DIR")) or key == "AUTHZ_POLICY_FILE":
                assert any(value.startswith(m.rstrip("/") + "/") or value == m for m in mounts), f"{name}: {key}"


def test_gateway_and_ingest_targets_are_services(objects: tuple[Obj, ...]) -> None:
    services = {o["metadata"]["name"]: o for o in of_kind(objects, "Service")}
    for name in ("gateway", "ingest"):
        env = container_env(main_container(name, named(objects, "Deployment", name)["spec"]["template"]), objects)
        for key, value in env.items():
            if key.endswith("_TARGET"):
                host, _, port = value.rpartition(":")
                assert int(port) in {p["port"] for p in services[host]["spec"]["ports"]}, f"{name}: {key}"


def test_authz_policy_copy_matches_the_repository_policy() -> None:
    assert (K8S / "base" / "authz-policy.toml").read_bytes() == (
        REPO / "deploy" / "policy" / "policy.toml"
    ).read_bytes(), "run: cp deploy/policy/policy.toml deploy/k8s/base/authz-policy.toml"


def test_dimse_peers_copy_matches_the_repository_file() -> None:
    assert (K8S / "base" / "dimse-peers.json").read_bytes() == (
        REPO / "deploy" / "policy" / "dimse-peers.json"
    ).read_bytes()


def test_production_policy_has_the_sample_roles_and_no_demo_people() -> None:
    sample = load_policy(REPO / "deploy" / "policy" / "policy.toml")
    production = load_policy(K8S / "overlays" / "production" / "authz-policy.toml")
    assert production.roles == sample.roles
    assert production.actions == sample.actions
    assert all(s.startswith("svc-") for s in production.subjects), production.subjects
    raw = tomllib.loads((K8S / "overlays" / "production" / "authz-policy.toml").read_text(encoding="utf-8"))
    assert raw["version"] != tomllib.loads((REPO / "deploy" / "policy" / "policy.toml").read_text("utf-8"))["version"]


def test_production_verifies_user_tokens() -> None:
    objs = render("production")
    env = container_env(main_container("authz", named(objs, "Deployment", "authz")["spec"]["template"]), objs)
    assert env["AUTHZ_OIDC_ISSUER"].startswith("https://"), "production must never trust subject ids"


# --- scaling -------------------------------------------------------------------------------------


def test_autoscaling_targets_and_bounds(objects: tuple[Obj, ...]) -> None:
    for hpa in of_kind(objects, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        named(objects, target["kind"], target["name"])
        assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        # HPA-owned: a replicas field would fight the autoscaler on every apply
        assert "replicas" not in named(objects, "Deployment", target["name"])["spec"]
    # #16: crypto and the gateway scale past one replica in every overlay, dev included;
    # they share no volume (objects are in S3), so rolling updates surge a second pod.
    for name in ("crypto", "gateway"):
        assert named(objects, "HorizontalPodAutoscaler", name)["spec"]["maxReplicas"] >= 2, name
        assert named(objects, "Deployment", name)["spec"]["strategy"]["type"] == "RollingUpdate", name
    crypto_pod = named(objects, "Deployment", "crypto")["spec"]["template"]["spec"]
    assert not any("persistentVolumeClaim" in v for v in crypto_pod["volumes"])


def test_consumer_replicas_never_exceed_partitions(objects: tuple[Obj, ...]) -> None:
    partitions = {s.name: s.partitions for s in topic_specs(Topics(), 6)}
    for name, topic in (("ingest", Topics().ingest), ("audit", Topics().audit)):
        deployment = named(objects, "Deployment", name)
        if "replicas" in deployment["spec"]:
            assert deployment["spec"]["replicas"] <= partitions[topic]
    for so in of_kind(objects, "ScaledObject"):
        name = so["spec"]["scaleTargetRef"]["name"]
        trigger = so["spec"]["triggers"][0]["metadata"]
        assert so["spec"]["maxReplicaCount"] <= partitions[trigger["topic"]]
        assert trigger["allowIdleConsumers"] == "false"
        env = container_env(main_container(name, named(objects, "Deployment", name)["spec"]["template"]), objects)
        group_var = f"{name.upper()}_GROUP_ID"
        assert trigger["consumerGroup"] == env[group_var]
        assert "replicas" not in named(objects, "Deployment", name)["spec"], "KEDA owns the replica count"


def test_strimzi_topics_match_topic_specs() -> None:
    topics = {o["spec"]["topicName"]: o["spec"] for o in of_kind(render("production"), "KafkaTopic")}
    specs = topic_specs(Topics(), 6)
    assert set(topics) == {s.name for s in specs}
    for s in specs:
        assert topics[s.name]["partitions"] == s.partitions, s.name
        config = {k: str(v) for k, v in topics[s.name]["config"].items()}
        assert config == {**s.configs, "min.insync.replicas": "2"}, s.name
        assert topics[s.name]["replicas"] == 3


def test_kafka_users_have_least_privilege() -> None:
    users = {
        o["metadata"]["name"]: o["spec"]["authorization"]["acls"] for o in of_kind(render("production"), "KafkaUser")
    }
    assert set(users) == {f"dicomsafe-{s}" for s in (*SERVICES, "tiering")}
    for name, acls in users.items():
        ops = {(a["resource"]["name"], op) for a in acls for op in a["operations"]}
        assert ("audit.events", "Write") in ops or name == "dicomsafe-audit", name
        if name == "dicomsafe-authz":  # emergency override started/stopped alerts
            assert ("security.alerts", "Write") in ops
        if name == "dicomsafe-audit":  # signed checkpoints, outside the audit database
            assert ("audit.checkpoints", "Write") in ops
        assert all(a["resource"]["patternType"] == "literal" for a in acls), name
        assert not {op for _, op in ops} & {"All", "Alter", "Delete", "AlterConfigs", "Create"}, name
        readers = {r for r, op in ops if op == "Read"}
        expected = {
            "dicomsafe-ingest": {"dicom.ingest", "dicomsafe-ingest"},
            # audit.checkpoints: read back by `verify --published-checkpoints`.
            "dicomsafe-audit": {"audit.events", "dicomsafe-audit", "audit.checkpoints"},
            "dicomsafe-gateway": {"dicom.stored", "dicom.erased", "dicomsafe-gateway-index"},
        }
        assert readers == expected.get(name, set()), name


def test_disruption_budgets_select_their_pods_and_allow_drains(objects: tuple[Obj, ...]) -> None:
    pods = _pods(objects)
    for pdb in of_kind(objects, "PodDisruptionBudget"):
        name = pdb["metadata"]["name"]
        assert [p for p, labels in pods.items() if _selects(pdb["spec"]["selector"], labels)] == [name]
        assert pdb["spec"]["maxUnavailable"] >= 1, "a single-replica dev pod must still be drainable"


def test_services_route_to_named_container_ports(objects: tuple[Obj, ...]) -> None:
    for svc in of_kind(objects, "Service"):
        selector = {"matchLabels": svc["spec"]["selector"]}
        # Each Service fronts one Deployment (several may front the same one: dicom, dicom-qr).
        [deployment] = [
            d for d in of_kind(objects, "Deployment") if _selects(selector, d["spec"]["template"]["metadata"]["labels"])
        ]
        name, pod = deployment["metadata"]["name"], deployment["spec"]["template"]
        ports = {p["name"] for p in main_container(name, pod)["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports, svc["metadata"]["name"]


def test_each_service_serves_mutual_tls_with_its_own_certificate() -> None:
    objs = render("production")
    certs = {c["spec"]["secretName"]: c for c in of_kind(objs, "Certificate")}
    for deployment in of_kind(objs, "Deployment"):
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]
        env = container_env(main_container(name, pod), objs)
        assert "DICOMSAFE_INSECURE_DEV" not in env, name
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        mount = next(m for m in main_container(name, pod)["volumeMounts"] if m["name"] == "tls")
        assert {env[k].rpartition("/")[0] for k in ("TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CA_FILE")} == {
            mount["mountPath"]
        }, name
        secret = volumes["tls"]["secret"]
        assert not secret.get("optional"), f"{name}: a missing certificate must stop the pod"
        assert certs[secret["secretName"]]["spec"]["uris"] == [f"spiffe://dicomsafe/{name}"], name
        assert "server auth" in certs[secret["secretName"]]["spec"]["usages"], name
