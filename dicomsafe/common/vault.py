"""A Vault (or OpenBao) session for a service's own narrow identity.

A static token (e.g. the one a Vault/OpenBao proxy sidecar keeps current), AppRole login, or
Kubernetes auth with the pod's projected service-account token. A login token is renewed before
it runs out (a fresh login when it cannot be), and a refused token triggers one re-login. Every
failure to reach or use Vault, login included, becomes ``VaultUnavailable`` so callers fail
closed and retry; only answers a caller declares ``expected`` pass through. Blocking: call it
from a worker thread.
"""

from __future__ import annotations

import logging
import math
import threading
import time
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
    """Thread-safe: worker threads share one client and one login.

    A token this session logged in for is renewed (``renew-self``) before a call once less than
    a third of its TTL remains, and replaced by a fresh login when renewal fails or the token
    has reached its maximum TTL. A static token is never renewed here: whoever issued it (e.g.
    a proxy sidecar) keeps it current.
    """

    def __init__(self, auth: VaultAuth, clock: Callable[[], float] = time.monotonic) -> None:
        if not auth.token and auth.login_method is None:
            raise ValueError("Vault needs VAULT_TOKEN, VAULT_ROLE_ID + VAULT_SECRET_ID, or VAULT_K8S_ROLE")
        self._auth = auth
        self._clock = clock
        self._lock = threading.Lock()
        self.client = hvac.Client(url=auth.addr, token=auth.token, verify=auth.ca_cert or True, timeout=auth.timeout_s)
        # The token's lease. A static token's lifetime is its issuer's business: used until
        # refused, then (if this session can log in) replaced by a login token.
        self._lease: _Lease | None = _Lease(0.0, math.inf, renewable=False) if auth.token else None
        self._needs_login = self._lease is None
        # Counters for operators' logs and tests: how the token was kept current.
        self.logins = 0
        self.renewals = 0

    # -- keeping the token current ------------------------------------------------------------

    def _login_locked(self) -> None:
        auth = self._auth
        try:
            if auth.login_method == "kubernetes":
                response = self.client.auth.kubernetes.login(
                    role=auth.k8s_role, jwt=self._service_account_token(), mount_point=auth.k8s_mount
                )
            else:
                response = self.client.auth.approle.login(role_id=auth.role_id, secret_id=auth.secret_id)
        except (requests.exceptions.RequestException, hvac.exceptions.VaultError) as exc:
            # Whatever Vault answers to a login (400 for an expired secret-id, 403, 5xx) it is
            # about this identity or Vault, never about the data a caller asked for.
            raise _unavailable("login", exc) from None
        self._lease = _Lease.of(response, self._clock())
        self._needs_login = False
        self.logins += 1
        log.info("logged in to Vault", extra={"method": auth.login_method, "ttl_s": self._lease.ttl_s})

    def _renew_locked(self, lease: _Lease) -> bool:
        """True if the token now has enough time left; False = log in again instead."""
        try:
            response = self.client.auth.token.renew_self()
        except (requests.exceptions.RequestException, hvac.exceptions.VaultError) as exc:
            log.warning("Vault token renewal failed; logging in again", extra={"error": type(exc).__name__})
            return False
        renewed = _Lease.of(response, self._clock(), period_s=lease.ttl_s)
        self.renewals += 1
        if renewed.due(self._clock()):
            # Capped by the token's maximum TTL: renewing again would not help.
            return False
        self._lease = renewed
        return True

    def _token_usable_locked(self) -> bool:
        """False if a login is needed: none yet, refused, or near its end and not renewable."""
        lease = self._lease
        if self._needs_login or lease is None:
            return False
        if not lease.due(self._clock()):
            return True
        return lease.renewable and self._renew_locked(lease)

    def _current_token(self) -> str | None:
        """Logs in or renews as needed; returns the token the next request will use."""
        with self._lock:
            if self._auth.login_method is not None and not self._token_usable_locked():
                self._login_locked()
            token = self.client.token
            return str(token) if token else None

    def _invalidate(self, token: str | None) -> None:
        """The token was refused: log in again, unless another thread already did."""
        with self._lock:
            if self.client.token == token:
                self._needs_login = True

    def _service_account_token(self) -> str:
        try:
            jwt = Path(self._auth.k8s_token_path).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            # The path is not secret; the token is never echoed.
            raise VaultUnavailable(f"cannot read the service-account token ({type(exc).__name__})") from None
        if not jwt:
            raise VaultUnavailable("the service-account token file is empty")
        return jwt

    # -- requests -----------------------------------------------------------------------------

    def call(
        self,
        what: str,
        request: Callable[[hvac.Client], Any],
        *,
        expected: tuple[type[hvac.exceptions.VaultError], ...] = (),
    ) -> dict[str, object]:
        """One request with login, renewal and error mapping; returns the response's ``data``.

        The one place Vault errors are mapped: the answers listed in ``expected`` (e.g.
        ``InvalidRequest`` from ``decrypt``: the ciphertext did not authenticate) pass through
        for the caller to interpret; anything else Vault says or fails to say, at login or in
        the request, is ``VaultUnavailable`` (fail closed, retry later).
        """
        for attempt in (1, 2):
            token = self._current_token()
            try:
                result = request(self.client)
            except expected:
                raise
            except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized) as exc:
                # An expired or revoked login token: log in again once; a static token cannot recover.
                if attempt == 1 and self._auth.login_method is not None:
                    self._invalidate(token)
                    continue
                raise _unavailable(what, exc) from None
            except (requests.exceptions.RequestException, hvac.exceptions.VaultError) as exc:
                raise _unavailable(what, exc) from None
            # Writes and deletes answer 204 with no body: hvac hands back the bare response.
            return dict(result["data"]) if isinstance(result, dict) else {}
        raise VaultUnavailable(f"Vault refused {what}")


# Vault answers that mean it is there but says no (to this identity or this request).
_REFUSALS = (
    hvac.exceptions.Forbidden,
    hvac.exceptions.Unauthorized,
    hvac.exceptions.InvalidRequest,
    hvac.exceptions.InvalidPath,
    hvac.exceptions.PreconditionFailed,
    hvac.exceptions.UnsupportedOperation,
)


def _unavailable(what: str, exc: BaseException) -> VaultUnavailable:
    # Only the exception's type: Vault's message may echo what was sent.
    verb = "refused" if isinstance(exc, _REFUSALS) else "unavailable during"
    return VaultUnavailable(f"Vault {verb} {what} ({type(exc).__name__})")


@dataclass(frozen=True)
class _Lease:
    """A login token's lifetime as granted by Vault."""

    ttl_s: float  # the TTL granted at login: renewal starts when a third of it is left
    expires_at: float  # on the session's clock; inf = no expiry
    renewable: bool

    @classmethod
    def of(cls, response: object, now: float, period_s: float | None = None) -> _Lease:
        auth = response.get("auth") if isinstance(response, dict) else None
        auth = auth if isinstance(auth, dict) else {}
        ttl = float(auth.get("lease_duration") or 0)
        if ttl <= 0:
            return cls(period_s or 0.0, math.inf, False)
        return cls(period_s or ttl, now + ttl, bool(auth.get("renewable")))

    def due(self, now: float) -> bool:
        return self.expires_at - now < self.ttl_s / 3
