"""A real, minimal OpenID Connect issuer for tests, the demo and the development viewer: it serves
discovery and a JWKS over HTTP on loopback, signs access tokens with keys generated at start-up,
and signs browsers in with the authorization code flow and PKCE (tools.oidc_login).

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
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tools.oidc_login import (
    SESSION_COOKIE,
    SESSION_LIFETIME_S,
    Login,
    LoginError,
    login_page,
    origin_of,
    redirect_with,
)

# A sign-in or token request is a few hundred bytes.
MAX_FORM_BYTES = 16 * 1024


class LocalIssuer:
    def __init__(self) -> None:
        self._rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._ec = ec.generate_private_key(ec.SECP256R1())
        self.rsa_kid, self.ec_kid = f"rsa-{uuid.uuid4().hex[:8]}", f"ec-{uuid.uuid4().hex[:8]}"
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        # Browser sign-in (authorization code + PKCE): clients and users are registered by the caller.
        self.login = Login()
        self.browser_token_lifetime_s = 900

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
                path, params = _split(self.path)
                if path == "/.well-known/openid-configuration":
                    self._json(200, issuer.discovery())
                elif path == "/jwks.json":
                    self._json(200, issuer.jwks())
                elif path == "/authorize":
                    self._authorize(params, None)
                elif path == "/userinfo":
                    self._userinfo()
                elif path == "/logout":
                    self._logout(params)
                else:
                    self.send_error(404)

            def do_POST(self) -> None:
                path, _ = _split(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_FORM_BYTES:
                    self.send_error(413)
                    return
                form = dict(parse_qsl(self.rfile.read(length).decode("utf-8", "replace")))
                if path == "/authorize":
                    self._authorize(form, (form.pop("username", ""), form.pop("password", "")))
                elif path == "/token":
                    self._token(form)
                else:
                    self.send_error(404)

            def do_OPTIONS(self) -> None:
                # Preflight of user info (Authorization header) from a registered client's origin.
                self.send_response(204)
                if self._cors():
                    self.send_header("Access-Control-Allow-Methods", "GET, POST")
                    self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
                    self.send_header("Access-Control-Max-Age", "600")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _authorize(self, params: dict[str, str], credentials: tuple[str, str] | None) -> None:
                try:
                    _client, redirect_uri = issuer.login.client_for(params)
                except LoginError as exc:
                    self._json(exc.status, {"error": exc.error, "error_description": exc.description})
                    return
                state = {"state": params["state"]} if "state" in params else {}
                session = ""
                try:
                    if credentials is None:
                        code = issuer.login.resume(params, self._session_cookie())
                        if code is None:
                            self._page(200, login_page(params))
                            return
                    else:
                        code, session = issuer.login.sign_in(params, *credentials)
                except LoginError as exc:
                    if exc.error == "access_denied":
                        self._page(401, login_page(params, failed=True))
                    else:
                        self._redirect(redirect_with(redirect_uri, {"error": exc.error, **state}))
                    return
                cookie = (
                    f"{SESSION_COOKIE}={session}; Path=/; HttpOnly; SameSite=Lax; Max-Age={SESSION_LIFETIME_S}"
                    if session
                    else ""
                )
                self._redirect(redirect_with(redirect_uri, {"code": code, **state}), cookie)

            def _token(self, form: dict[str, str]) -> None:
                try:
                    granted = issuer.login.redeem(form)
                except LoginError as exc:
                    self._json(exc.status, {"error": exc.error, "error_description": exc.description})
                    return
                lifetime = issuer.browser_token_lifetime_s
                access = issuer.token(granted.subject, amr=granted.amr, lifetime_s=lifetime)
                nonce = {"nonce": granted.nonce} if granted.nonce else {}
                id_token = issuer.token(
                    granted.subject, audience=granted.client_id, amr=granted.amr, lifetime_s=lifetime, extra=nonce
                )
                self._json(
                    200,
                    {
                        "access_token": access,
                        "id_token": id_token,
                        "token_type": "Bearer",
                        "expires_in": lifetime,
                        "scope": granted.scope,
                    },
                )

            def _userinfo(self) -> None:
                scheme, _, token = self.headers.get("Authorization", "").partition(" ")
                subject = issuer.verified_subject(token) if scheme.lower() == "bearer" else None
                if subject is None:
                    self._json(401, {"error": "invalid_token"})
                else:
                    self._json(200, {"sub": subject, "preferred_username": subject})

            def _logout(self, params: dict[str, str]) -> None:
                # Ends the sign-in session; tokens already issued are not revocable here (they expire).
                issuer.login.end_session(self._session_cookie())
                target = params.get("post_logout_redirect_uri", "")
                if target and origin_of(target) in issuer.login.allowed_origins:
                    self._redirect(target)
                else:
                    self._page(200, b"<!doctype html><title>Signed out</title><p>Signed out.</p>")

            def _cors(self) -> bool:
                origin = self.headers.get("Origin", "")
                if origin and origin in issuer.login.allowed_origins:
                    self.send_header("Access-Control-Allow-Origin", origin)
                    self.send_header("Vary", "Origin")
                    return True
                return False

            def _json(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self._cors()
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _page(self, status: int, page: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Cache-Control", "no-store")
                # The form may be framed by no one: a framed sign-in is a clickjacking target.
                self.send_header("Content-Security-Policy", "frame-ancestors 'none'")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def _session_cookie(self) -> str:
                jar = SimpleCookie()
                try:
                    jar.load(self.headers.get("Cookie", ""))
                except CookieError:
                    return ""
                morsel = jar.get(SESSION_COOKIE)
                return morsel.value if morsel else ""

            def _redirect(self, location: str, cookie: str = "") -> None:
                self.send_response(302)
                self.send_header("Location", location)
                if cookie:
                    self.send_header("Set-Cookie", cookie)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.url,
            "jwks_uri": self.jwks_url,
            "authorization_endpoint": f"{self.url}/authorize",
            "token_endpoint": f"{self.url}/token",
            "userinfo_endpoint": f"{self.url}/userinfo",
            "end_session_endpoint": f"{self.url}/logout",
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code"],
            "code_challenge_methods_supported": ["S256"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256", "RS256"],
            "token_endpoint_auth_methods_supported": ["none"],
            "scopes_supported": ["openid", "profile"],
        }

    def verified_subject(self, token: str) -> str | None:
        """The subject of an access token this issuer signed and that is still valid, else None."""
        try:
            header = jwt.get_unverified_header(token)
            key: Any = self._ec.public_key() if header.get("kid") == self.ec_kid else self._rsa.public_key()
            claims = jwt.decode(token, key, algorithms=["ES256", "RS256"], audience="dicomsafe", issuer=self.url)
        except jwt.PyJWTError:
            return None
        return str(claims["sub"])

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


def _split(target: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(target)
    return parts.path, dict(parse_qsl(parts.query))
