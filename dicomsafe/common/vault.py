"""A Vault (or OpenBao) session for a service's own narrow identity.

AppRole login (preferred) or a static token; one re-login when a token has expired; every
failure to reach or use Vault becomes ``VaultUnavailable`` so callers fail closed and retry.
Blocking: call it from a worker thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import hvac
import hvac.exceptions
import requests

from dicomsafe.common.config import env_secret, env_str

log = logging.getLogger("dicomsafe.vault")


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


def vault_auth_from_env() -> VaultAuth:
    """VAULT_ADDR plus VAULT_ROLE_ID/VAULT_SECRET_ID (preferred) or VAULT_TOKEN, each also as *_FILE."""
    return VaultAuth(
        addr=env_str("VAULT_ADDR"),
        token=env_secret("VAULT_TOKEN"),
        role_id=env_secret("VAULT_ROLE_ID"),
        secret_id=env_secret("VAULT_SECRET_ID"),
        ca_cert=env_secret("VAULT_CACERT_PATH"),
    )


class VaultSession:
    def __init__(self, auth: VaultAuth) -> None:
        if not auth.token and not (auth.role_id and auth.secret_id):
            raise ValueError("Vault needs VAULT_TOKEN or VAULT_ROLE_ID + VAULT_SECRET_ID")
        self._auth = auth
        self._lock = threading.Lock()
        self.client = hvac.Client(url=auth.addr, token=auth.token, verify=auth.ca_cert or True, timeout=auth.timeout_s)
        self._logged_in = bool(auth.token)

    def _login(self) -> None:
        with self._lock:
            self.client.auth.approle.login(role_id=self._auth.role_id, secret_id=self._auth.secret_id)
            self._logged_in = True
            log.info("logged in to Vault with AppRole")

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
                # An expired AppRole token: log in again once; a static token cannot recover.
                if attempt == 1 and self._auth.role_id:
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
