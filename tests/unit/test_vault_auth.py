"""Vault identity settings: AppRole, Kubernetes auth (projected service-account token), static token.

Kubernetes auth cannot be exercised end to end here: Vault's Kubernetes auth method asks the
cluster's TokenReview API about every token, and there is no cluster on these machines. What
is tested is the configuration path and that a login fails closed without echoing the token.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomsafe.common.vault import (
    DEFAULT_K8S_TOKEN_PATH,
    VaultAuth,
    VaultSession,
    VaultUnavailable,
    _Lease,
    vault_auth_from_env,
)
from services.crypto.config import CryptoConfig
from services.crypto.vault_keys import TransitKeys

_IDENTITY_VARS = ("VAULT_TOKEN", "VAULT_ROLE_ID", "VAULT_SECRET_ID", "VAULT_K8S_ROLE", "VAULT_K8S_TOKEN_PATH")
# A closed port: the session must fail before or at the first request, never hang.
_NO_VAULT = "http://127.0.0.1:1"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in _IDENTITY_VARS + tuple(f"{n}_FILE" for n in _IDENTITY_VARS) + ("VAULT_K8S_MOUNT",):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VAULT_ADDR", "https://vault.example:8200")
    monkeypatch.setenv("KAFKA_BOOTSTRAP", "kafka:9092")
    # CryptoConfig.from_env wants TLS material; these tests are about Vault, not transport.
    for name in ("TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DICOMSAFE_INSECURE_DEV", "1")
    return monkeypatch


def test_kubernetes_auth_is_configured_from_the_environment(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    token_file = tmp_path / "vault-token"
    clean_env.setenv("VAULT_K8S_ROLE", "dicomsafe-crypto")
    clean_env.setenv("VAULT_K8S_TOKEN_PATH", str(token_file))
    clean_env.setenv("VAULT_K8S_MOUNT", "k8s-prod")
    auth = vault_auth_from_env()
    assert auth.login_method == "kubernetes"
    assert (auth.k8s_role, auth.k8s_token_path, auth.k8s_mount) == ("dicomsafe-crypto", str(token_file), "k8s-prod")
    vault = CryptoConfig.from_env().vault
    assert (vault.k8s_role, vault.k8s_token_path, vault.k8s_mount) == ("dicomsafe-crypto", str(token_file), "k8s-prod")
    assert vault.token is None and vault.role_id is None
    TransitKeys(vault)  # a role alone is a complete identity: no sidecar token needed


def test_kubernetes_auth_defaults_to_the_service_account_token(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("VAULT_K8S_ROLE", "dicomsafe-audit")
    auth = vault_auth_from_env()
    assert auth.k8s_token_path == DEFAULT_K8S_TOKEN_PATH
    assert auth.k8s_mount == "kubernetes"


def test_approle_is_used_when_both_are_configured(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("VAULT_K8S_ROLE", "dicomsafe-crypto")
    clean_env.setenv("VAULT_ROLE_ID", "role")
    clean_env.setenv("VAULT_SECRET_ID", "secret")
    assert vault_auth_from_env().login_method == "approle"


def test_a_static_token_alone_never_logs_in(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("VAULT_TOKEN", "s.sidecar")
    assert vault_auth_from_env().login_method is None


def test_no_identity_at_all_is_refused(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="VAULT_K8S_ROLE"):
        VaultSession(vault_auth_from_env())


def test_missing_service_account_token_fails_closed(tmp_path: Path) -> None:
    session = VaultSession(
        VaultAuth(addr=_NO_VAULT, k8s_role="dicomsafe-crypto", k8s_token_path=str(tmp_path / "none"))
    )
    with pytest.raises(VaultUnavailable, match="service-account token"):
        session.call("datakey", lambda c: c.secrets.transit.read_key("dicomsafe-dek"))


def test_empty_service_account_token_fails_closed(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("\n", encoding="ascii")
    session = VaultSession(VaultAuth(addr=_NO_VAULT, k8s_role="dicomsafe-crypto", k8s_token_path=str(token_file)))
    with pytest.raises(VaultUnavailable, match="empty"):
        session.call("datakey", lambda c: c.secrets.transit.read_key("dicomsafe-dek"))


def test_login_failure_never_echoes_the_token(tmp_path: Path) -> None:
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQifQ.c2lnbmF0dXJl"
    token_file = tmp_path / "token"
    token_file.write_text(jwt + "\n", encoding="ascii")
    session = VaultSession(VaultAuth(addr=_NO_VAULT, k8s_role="dicomsafe-crypto", k8s_token_path=str(token_file)))
    with pytest.raises(VaultUnavailable) as info:
        session.call("datakey", lambda c: c.secrets.transit.read_key("dicomsafe-dek"))
    assert jwt not in str(info.value)
    assert "unavailable" in str(info.value)


def test_a_static_token_is_used_before_any_login() -> None:
    # With both a (sidecar) token and a login method, the token is tried first: no request to
    # the closed port happens before the call itself.
    session = VaultSession(VaultAuth(addr=_NO_VAULT, token="s.sidecar", role_id="role", secret_id="secret"))
    assert session._current_token() == "s.sidecar"
    assert session.logins == 0


def test_a_lease_is_due_for_renewal_once_a_third_of_its_ttl_is_left() -> None:
    session = VaultSession(VaultAuth(addr=_NO_VAULT, role_id="role", secret_id="secret"), clock=lambda: 100.0)
    lease = _Lease.of({"auth": {"lease_duration": 30, "renewable": True}}, 100.0)
    assert (lease.ttl_s, lease.expires_at, lease.renewable) == (30.0, 130.0, True)
    assert not lease.due(119.9) and lease.due(120.1)
    capped = _Lease.of({"auth": {"lease_duration": 5, "renewable": True}}, 125.0, period_s=lease.ttl_s)
    assert capped.due(125.0)  # a renewal capped by the maximum TTL leaves less than a third: log in
    forever = _Lease.of({"auth": {"lease_duration": 0}}, 100.0)
    assert not forever.due(1e12)
    with pytest.raises(VaultUnavailable, match="unavailable during login"):
        session._current_token()  # a login that cannot reach Vault fails closed
