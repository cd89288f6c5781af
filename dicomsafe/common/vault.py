"""A Vault (or OpenBao) session for a service's own narrow identity.

A static token (e.g. the one a Vault/OpenBao proxy sidecar keeps current), AppRole login, or
Kubernetes auth with the pod's projected service-account token; one re-login when a token has
expired; every failure to reach or use Vault becomes ``VaultUnavailable`` so callers fail
closed and retry. Blocking: call it from a worker thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import requests

from dicomsafe.common.config import env_opt, env_secret, env_str

log = logging.getLogger("dicomsafe.vault")

# Where the kubelet mounts the default service-account token; a projected token with audience
# "vault" is mounted elsewhere and named by VAULT_K8S_TOKEN_PATH.
DEFAULT_K8S_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # noqa: S105 (a path)


class VaultUnavailable(Exception):
    """Vault cannot be reached or refuses this identity: fail closed, retry later."""


@dataclass(frozen=True)
class VaultAuth:
    addr: str
    token: str | None = None
    role_id: str | None = None
    secret_id: str | None = None
    ca_cert: str | None = None
    timeout_s: float = 10.0
    # Kubernetes auth: the Vault role bound to the pod's service account, the token file (re-read
    # at every login: the kubelet rotates projected tokens) and the auth method's mount path.
    k8s_role: str | None = None
    k8s_token_path: str = DEFAULT_K8S_TOKEN_PATH
    k8s_mount: str = "kubernetes"

    @property
    def login_method(self) -> str | None:
        """How the session (re-)logs in: "approle", "kubernetes", or None (static token only)."""
        if self.role_id and self.secret_id:
            return "approle"
        if self.k8s_role:
            return "kubernetes"
        return None


def vault_auth_from_env() -> VaultAuth:
    """VAULT_ADDR plus VAULT_ROLE_ID/VAULT_SECRET_ID, VAULT_K8S_ROLE (Kubernetes auth) or
    VAULT_TOKEN; secrets also as *_FILE."""
    return VaultAuth(
        addr=env_str("VAULT_ADDR"),
        token=env_secret("VAULT_TOKEN"),
        role_id=env_secret("VAULT_ROLE_ID"),
        secret_id=env_secret("VAULT_SECRET_ID"),
        ca_cert=env_secret("VAULT_CACERT_PATH"),
        k8s_role=env_opt("VAULT_K8S_ROLE") or None,
        k8s_token_path=env_str("VAULT_K8S_TOKEN_PATH", DEFAULT_K8S_TOKEN_PATH),
        k8s_mount=env_str("VAULT_K8S_MOUNT", "kubernetes"),
    )


class VaultSession:
    def __init__(self, auth: VaultAuth) -> None:
        if not auth.token and auth.login_method is None:
            raise ValueError("Vault needs VAULT_TOKEN, VAULT_ROLE_ID + VAULT_SECRET_ID, or VAULT_K8S_ROLE")
        self._auth = auth
        self._lock = threading.Lock()
        self.client = hvac.Client(url=auth.addr, token=auth.token, verify=auth.ca_cert or True, timeout=auth.timeout_s)
        self._logged_in = bool(auth.token)

    def _login(self) -> None:
        auth = self._auth
        with self._lock:
            if auth.login_method == "kubernetes":
                self.client.auth.kubernetes.login(
                    role=auth.k8s_role, jwt=self._service_account_token(), mount_point=auth.k8s_mount
                )
            else:
                self.client.auth.approle.login(role_id=auth.role_id, secret_id=auth.secret_id)
            self._logged_in = True
            log.info("logged in to Vault", extra={"method": auth.login_method})

    def _service_account_token(self) -> str:
        try:
            jwt = Path(self._auth.k8s_token_path).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            # The path is not secret; the token is never echoed.
            raise VaultUnavailable(f"cannot read the service-account token ({type(exc).__name__})") from None
        if not jwt:
            raise VaultUnavailable("the service-account token file is empty")
        return jwt

    def call(self, what: str, request: Callable[[hvac.Client], Any]) -> dict[str, object]:
        """One request with re-login and error mapping; returns the response's ``data``.

        Vault's 400/404 answers (``InvalidRequest``, ``InvalidPath``) pass through: they are
        about the request, not about Vault being unavailable.
        """
        for attempt in (1, 2):
            try:
                if not self._logged_in:
                    self._login()
                result = request(self.client)
                # Writes and deletes answer 204 with no body: hvac hands back the bare response.
                return dict(result["data"]) if isinstance(result, dict) else {}
            except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized) as exc:
                # An expired login token: log in again once; a static token cannot recover.
                if attempt == 1 and self._auth.login_method is not None:
                    self._logged_in = False
                    continue
                raise VaultUnavailable(f"Vault refused {what} ({type(exc).__name__})") from None
            except (
                requests.exceptions.RequestException,
                hvac.exceptions.VaultDown,
                hvac.exceptions.InternalServerError,
                hvac.exceptions.BadGateway,
                hvac.exceptions.RateLimitExceeded,
            ) as exc:
                raise VaultUnavailable(f"Vault unavailable during {what} ({type(exc).__name__})") from None
        raise VaultUnavailable(f"Vault refused {what}")
