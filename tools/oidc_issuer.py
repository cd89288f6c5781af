"""A real, minimal OpenID Connect issuer for tests and the demo: it serves discovery and a JWKS
over HTTP on loopback and signs access tokens with keys generated at start-up.

It is an issuer, not a mock: authz fetches its keys over HTTP and verifies signatures exactly as
it would against a hospital's identity provider (Keycloak, Entra ID, …).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm


class LocalIssuer:
    def __init__(self) -> None:
        self._rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._ec = ec.generate_private_key(ec.SECP256R1())
        self.rsa_kid, self.ec_kid = f"rsa-{uuid.uuid4().hex[:8]}", f"ec-{uuid.uuid4().hex[:8]}"
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def jwks_url(self) -> str:
        return f"{self.url}/jwks.json"

    def jwks(self) -> dict[str, Any]:
        rsa_jwk = json.loads(RSAAlgorithm.to_jwk(self._rsa.public_key()))
        ec_jwk = json.loads(ECAlgorithm.to_jwk(self._ec.public_key()))
        return {
            "keys": [
                {**rsa_jwk, "kid": self.rsa_kid, "use": "sig", "alg": "RS256"},
                {**ec_jwk, "kid": self.ec_kid, "use": "sig", "alg": "ES256"},
            ]
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/.well-known/openid-configuration":
                    body: dict[str, Any] = {"issuer": issuer.url, "jwks_uri": issuer.jwks_url}
                elif self.path == "/jwks.json":
                    body = issuer.jwks()
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def token(
        self,
        subject: str,
        audience: str = "dicomsafe",
        *,
        amr: Sequence[str] = ("pwd",),
        lifetime_s: int = 300,
        not_before_s: int = 0,
        algorithm: str = "ES256",
        issuer: str | None = None,
        kid: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        now = int(time.time())
        claims = {
            "iss": issuer or self.url,
            "sub": subject,
            "aud": audience,
            "iat": now,
            "nbf": now + not_before_s,
            "exp": now + lifetime_s,
            "amr": list(amr),
            "jti": uuid.uuid4().hex,
            **(extra or {}),
        }
        key: Any = self._ec if algorithm == "ES256" else self._rsa
        default_kid = self.ec_kid if algorithm == "ES256" else self.rsa_kid
        return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": kid or default_kid})

    def start(self) -> LocalIssuer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextmanager
def running_issuer() -> Iterator[LocalIssuer]:
    issuer = LocalIssuer().start()
    try:
        yield issuer
    finally:
        issuer.stop()
