"""The development issuer's browser sign-in (authorization code + PKCE) over real HTTP on loopback:
what a viewer's oidc-client does, and each way a request is refused."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
import requests

from tools.oidc_issuer import LocalIssuer, running_issuer
from tools.oidc_login import Login, s256

ORIGIN = "http://127.0.0.1:3999"
REDIRECT = f"{ORIGIN}/callback"
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def idp() -> Iterator[LocalIssuer]:
    with running_issuer() as issuer:
        issuer.login.register_client("viewer", [REDIRECT])
        issuer.login.add_user("dr.house", PASSWORD)
        yield issuer


def _request(verifier: str, **changes: str) -> dict[str, str]:
    params = {
        "client_id": "viewer",
        "redirect_uri": REDIRECT,
        "response_type": "code",
        "scope": "openid profile",
        "state": "s-42",
        "nonce": "n-7",
        "code_challenge": s256(verifier),
        "code_challenge_method": "S256",
    }
    return {**params, **changes}


def _sign_in(idp: LocalIssuer, params: dict[str, str], password: str = PASSWORD) -> requests.Response:
    form = {**params, "username": "dr.house", "password": password}
    return requests.post(f"{idp.url}/authorize", data=form, allow_redirects=False, timeout=10)


def _code(idp: LocalIssuer, verifier: str) -> str:
    answer = _sign_in(idp, _request(verifier))
    assert answer.status_code == 302
    query = parse_qs(urlsplit(answer.headers["Location"]).query)
    assert query["state"] == ["s-42"]
    return query["code"][0]


def _redeem(idp: LocalIssuer, code: str, verifier: str, **changes: str) -> requests.Response:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "client_id": "viewer",
        "code_verifier": verifier,
        **changes,
    }
    return requests.post(f"{idp.url}/token", data=form, headers={"Origin": ORIGIN}, timeout=10)


def test_discovery_names_the_code_flow_endpoints(idp: LocalIssuer) -> None:
    found = requests.get(f"{idp.url}/.well-known/openid-configuration", headers={"Origin": ORIGIN}, timeout=10)
    body = found.json()
    assert body["authorization_endpoint"] == f"{idp.url}/authorize"
    assert body["token_endpoint"] == f"{idp.url}/token"
    assert body["code_challenge_methods_supported"] == ["S256"]
    assert found.headers["Access-Control-Allow-Origin"] == ORIGIN


def test_sign_in_then_tokens_for_the_gateway_and_the_client(idp: LocalIssuer) -> None:
    verifier = secrets.token_urlsafe(48)
    form = requests.get(f"{idp.url}/authorize", params=_request(verifier), timeout=10)
    assert form.status_code == 200 and 'name="password"' in form.text
    assert form.headers["Content-Security-Policy"] == "frame-ancestors 'none'"

    answer = _redeem(idp, _code(idp, verifier), verifier)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Access-Control-Allow-Origin"] == ORIGIN
    tokens = answer.json()
    keys = jwt.PyJWKClient(idp.jwks_url)
    access = tokens["access_token"]
    claims = jwt.decode(
        access, keys.get_signing_key_from_jwt(access).key, algorithms=["ES256"], audience="dicomsafe", issuer=idp.url
    )
    assert claims["sub"] == "dr.house" and claims["amr"] == ["pwd"]
    id_token = tokens["id_token"]
    id_key = keys.get_signing_key_from_jwt(id_token).key
    id_claims = jwt.decode(id_token, id_key, algorithms=["ES256"], audience="viewer")
    assert id_claims["nonce"] == "n-7"

    info = requests.get(f"{idp.url}/userinfo", headers={"Authorization": f"Bearer {access}"}, timeout=10)
    assert info.json()["sub"] == "dr.house"
    assert requests.get(f"{idp.url}/userinfo", headers={"Authorization": "Bearer x"}, timeout=10).status_code == 401


def test_a_code_is_single_use_and_bound_to_its_verifier(idp: LocalIssuer) -> None:
    verifier = secrets.token_urlsafe(48)
    code = _code(idp, verifier)
    wrong = _redeem(idp, code, secrets.token_urlsafe(48))
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"
    # The failed attempt used the code up: a thief who guesses wrong once gets nothing later.
    assert _redeem(idp, code, verifier).json()["error"] == "invalid_grant"

    again = _code(idp, verifier)
    assert _redeem(idp, again, verifier).status_code == 200
    assert _redeem(idp, again, verifier).json()["error"] == "invalid_grant"


def test_a_code_redeemed_for_another_redirect_uri_is_refused(idp: LocalIssuer) -> None:
    verifier = secrets.token_urlsafe(48)
    answer = _redeem(idp, _code(idp, verifier), verifier, redirect_uri=f"{ORIGIN}/elsewhere")
    assert answer.json()["error"] == "invalid_grant"


def test_wrong_password_shows_the_form_again_without_a_code(idp: LocalIssuer) -> None:
    answer = _sign_in(idp, _request("v" * 43), password="not the password")
    assert answer.status_code == 401 and 'id="error"' in answer.text
    assert "Location" not in answer.headers


def test_unregistered_redirect_uri_is_never_redirected_to(idp: LocalIssuer) -> None:
    answer = _sign_in(idp, _request("v" * 43, redirect_uri="https://attacker.example/cb"))
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_request"
    assert "Location" not in answer.headers


def test_requests_without_pkce_are_sent_back_with_an_error(idp: LocalIssuer) -> None:
    params = _request("v" * 43)
    del params["code_challenge"]
    answer = _sign_in(idp, params)
    assert answer.status_code == 302
    assert parse_qs(urlsplit(answer.headers["Location"]).query)["error"] == ["invalid_request"]


def test_other_origins_get_no_cors_grant(idp: LocalIssuer) -> None:
    found = requests.get(
        f"{idp.url}/.well-known/openid-configuration", headers={"Origin": "https://evil.example"}, timeout=10
    )
    assert "Access-Control-Allow-Origin" not in found.headers


def test_short_passwords_are_refused() -> None:
    with pytest.raises(ValueError, match="12 characters"):
        Login().add_user("x", "short")


def test_a_signed_in_browser_gets_a_code_without_the_password_again(idp: LocalIssuer) -> None:
    browser = requests.Session()
    verifier = secrets.token_urlsafe(48)
    form = {**_request(verifier), "username": "dr.house", "password": PASSWORD}
    first = browser.post(f"{idp.url}/authorize", data=form, allow_redirects=False, timeout=10)
    assert first.status_code == 302 and "HttpOnly" in first.headers["Set-Cookie"]

    again = browser.get(f"{idp.url}/authorize", params=_request(verifier), allow_redirects=False, timeout=10)
    assert again.status_code == 302
    code = parse_qs(urlsplit(again.headers["Location"]).query)["code"][0]
    assert _redeem(idp, code, verifier).status_code == 200
    # prompt=login asks for the password whatever the session; signing out ends the session.
    forced = browser.get(f"{idp.url}/authorize", params=_request(verifier, prompt="login"), timeout=10)
    assert forced.status_code == 200 and 'name="password"' in forced.text
    browser.get(f"{idp.url}/logout", timeout=10)
    after = browser.get(f"{idp.url}/authorize", params=_request(verifier), allow_redirects=False, timeout=10)
    assert after.status_code == 200 and 'name="password"' in after.text
    # Without the cookie (another browser) the password is asked for.
    fresh = requests.get(f"{idp.url}/authorize", params=_request(verifier), allow_redirects=False, timeout=10)
    assert fresh.status_code == 200
