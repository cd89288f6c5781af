"""The OHIF v3 viewer (npm ``@ohif/app``, its prebuilt dist/) served on loopback for development,
configured for the gateway's DICOMweb root and a sign-in at an OpenID Connect issuer.

OHIF is a static single-page application: every call it makes goes from the browser to the
gateway with the signed-in user's access token, so authz and audit see each one as they see any
other client's. This server only hands out files; it holds no token and no image.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import mimetypes
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from pydicom.uid import generate_uid

from dicomsafe.common.kafka import Topics, ensure_topics, topic_specs
from tools import dicom_samples, infra
from tools.oidc_issuer import LocalIssuer
from tools.stack import REPO, Stack, StackSettings

OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"
CLIENT_ID = "dicomsafe-viewer"
CALLBACK_PATH = "/callback"


class ViewerMissing(RuntimeError):
    """OHIF could not be installed here (no npm, or the registry refused)."""


def ensure_ohif() -> Path:
    """The dist/ of OHIF, fetched from the npm registry on first use into the infra cache.

    ``npm pack``, not ``npm install``: the prebuilt dist/ is all that is served, and the
    package's own dependency tree does not resolve on the registry (@ohif/i18n 3.13.2 is absent).
    Nothing of the package runs here."""
    root = infra.cache_dir() / f"ohif-{OHIF_VERSION}"
    dist = root / "dist"
    if (dist / "index.html").is_file():
        return dist
    npm = shutil.which("npm")
    if npm is None:
        raise ViewerMissing("npm is not installed: it fetches OHIF from the npm registry")
    with tempfile.TemporaryDirectory(dir=infra.cache_dir()) as tmp:
        packed = subprocess.run(
            [npm, "pack", "--silent", "--pack-destination", tmp, f"{OHIF_PACKAGE}@{OHIF_VERSION}"],
            capture_output=True, text=True, check=False, env={**os.environ, "npm_config_update_notifier": "false"},
        )  # fmt: skip
        tarballs = list(Path(tmp).glob("*.tgz"))
        if packed.returncode != 0 or len(tarballs) != 1:
            raise ViewerMissing(f"npm pack {OHIF_PACKAGE}@{OHIF_VERSION} failed: {packed.stderr.strip()[-400:]}")
        staging = Path(tmp) / "extracted"
        with tarfile.open(tarballs[0]) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith("package/dist/")]
            archive.extractall(staging, members=members, filter="data")
        if not (staging / "package" / "dist" / "index.html").is_file():
            raise ViewerMissing(f"{OHIF_PACKAGE}@{OHIF_VERSION} has no dist/index.html")
        root.mkdir(parents=True, exist_ok=True)
        # A rename: an interrupted fetch never leaves a half dist/ that counts as cached.
        (staging / "package" / "dist").rename(dist)
    return dist


@dataclass(frozen=True)
class ViewerConfig:
    dicomweb_url: str  # the gateway's DICOMweb root, e.g. https://127.0.0.1:50251/dicomweb
    issuer_url: str
    client_id: str = CLIENT_ID

    def window_config(self) -> dict[str, Any]:
        root = self.dicomweb_url.rstrip("/")
        return {
            "routerBasename": "/",
            "showStudyList": True,
            "extensions": [],
            "modes": [],
            # Two cores is the machine this is sized for; OHIF decodes in its web workers.
            "maxNumberOfWebWorkers": 2,
            "showLoadingIndicator": True,
            "strictZSpacingForVolumeViewport": True,
            "defaultDataSourceName": "dicomsafe",
            "dataSources": [
                {
                    "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                    "sourceName": "dicomsafe",
                    "configuration": {
                        "friendlyName": "dicomsafe gateway",
                        "name": "dicomsafe",
                        "wadoUriRoot": f"{root}/wado",
                        "qidoRoot": root,
                        "wadoRoot": root,
                        "qidoSupportsIncludeField": True,
                        "supportsFuzzyMatching": True,
                        "supportsWildcard": True,
                        "imageRendering": "wadors",
                        "thumbnailRendering": "wadors",
                        "enableStudyLazyLoad": True,
                        "supportsReject": False,
                        "omitQuotationForMultipartRequest": True,
                        "bulkDataURI": {"enabled": True},
                    },
                }
            ],
            "oidc": [
                {
                    "authority": self.issuer_url,
                    "client_id": self.client_id,
                    "redirect_uri": CALLBACK_PATH,
                    "response_type": "code",
                    "scope": "openid profile",
                    "post_logout_redirect_uri": "/logout-redirect.html",
                    "automaticSilentRenew": False,
                    "revokeAccessTokenOnSignout": False,
                }
            ],
        }

    def app_config_js(self) -> bytes:
        return f"window.config = {json.dumps(self.window_config(), indent=2)};\n".encode()


class ViewerServer:
    """OHIF's files on 127.0.0.1, with /app-config.js generated and every page route (no file
    extension) answered with index.html, as a single-page application's host must."""

    def __init__(self, dist: Path, config: ViewerConfig, port: int = 0) -> None:
        self._dist = dist.resolve()
        self._config = config
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.origin = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def redirect_uri(self) -> str:
        return self.origin + CALLBACK_PATH

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        viewer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                if path == "/app-config.js":
                    self._send(200, "application/javascript", viewer._config.app_config_js())
                    return
                file = viewer._file(path)
                if file is None:
                    self.send_error(404)
                    return
                kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
                self._send(200, kind, file.read_bytes())

            def _send(self, status: int, kind: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("Referrer-Policy", "no-referrer")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                # The browser may have left (a closed tab, a cancelled prefetch): nothing to answer.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def _file(self, path: str) -> Path | None:
        candidate = (self._dist / path.lstrip("/")).resolve()
        if not candidate.is_relative_to(self._dist):
            return None
        if candidate.is_file():
            return candidate
        if "." in candidate.name:  # a missing asset, not a page route
            return None
        return self._dist / "index.html"

    def start(self) -> ViewerServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def store_instances(dicomweb_url: str, ca_file: Path, token: str, instances: Sequence[bytes]) -> None:
    """STOW-RS of Part 10 files as one multipart body; raises unless every one is stored."""
    boundary = secrets.token_hex(12)
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n" for part in instances
    )
    reply = requests.post(
        f"{dicomweb_url}/studies",
        data=body + f"--{boundary}--\r\n".encode(),
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Authorization": f"Bearer {token}",
            "Accept": "application/dicom+json",
        },
        verify=str(ca_file),
        timeout=300,
    )
    if reply.status_code != 200:
        raise RuntimeError(f"STOW-RS answered {reply.status_code}: {reply.text[:300]}")


def viewer_studies(seed: int = 0) -> tuple[str, str, list[bytes]]:
    """A CT series and a multi-frame ultrasound of one synthetic patient: (CT study, US study, files)."""
    patient = dicom_samples.synthetic_patient(f"viewer-{seed}")
    ct_study, us_study = generate_uid(), generate_uid()
    ct = dicom_samples.ct_series(study_uid=ct_study, slices=4, seed=seed, patient=patient)
    us = dicom_samples.us_multiframe(study_uid=us_study, seed=seed + 5, patient=patient, frames=8, rows=96, columns=128)
    return ct_study, us_study, [dicom_samples.to_bytes(ds) for ds in (*ct, us)]


# Development sign-ins: a radiologist, a researcher (de-identified data) and a user with no role.
DEV_USERS = ("dr.house", "res.rao", "mallory")


def main() -> int:
    """`make viewer`: local servers, every service, sample studies and OHIF, until Ctrl-C."""
    from tools.demo import resolve_servers, say  # the demo's server choice: env, else local ones

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, default=3000, help="the viewer's port on 127.0.0.1")
    args = parser.parse_args()
    dist = ensure_ohif()
    work = REPO / "var" / "viewer" / time.strftime("%Y%m%d-%H%M%S")
    servers = resolve_servers()
    topics = Topics(prefix=f"viewer{int(time.time())}.")
    asyncio.run(ensure_topics(servers.kafka, topic_specs(topics)))
    idp = LocalIssuer().start()
    origin = f"http://127.0.0.1:{args.port}"
    idp.login.register_client(CLIENT_ID, [origin + CALLBACK_PATH])
    passwords = {user: secrets.token_urlsafe(12) for user in DEV_USERS}
    for user, password in passwords.items():
        idp.login.add_user(user, password)
    settings = StackSettings(
        kafka_bootstrap=servers.kafka,
        vault_addr=servers.vault_addr,
        mongodb_uri=servers.mongo,
        vault_admin_token=servers.vault_token,
        work_dir=work,
        topic_prefix=topics.prefix,
        audit_db=f"dicomsafe_audit_{topics.prefix.strip('.')}",
        oidc_issuer=idp.url,
        oidc_jwks_url=idp.jwks_url,
        cors_origins=(origin,),
    )
    stack = Stack(settings)
    try:
        stack.start()
        ct_study, us_study, files = viewer_studies()
        store_instances(settings.dicomweb_url, settings.ca_file, idp.token("tech.jane"), files)
        asyncio.run(stack.wait_indexed({ct_study, us_study}))
        server = ViewerServer(dist, ViewerConfig(settings.dicomweb_url, idp.url), port=args.port).start()
        say(f"OHIF: {origin}/  (the gateway's certificate comes from the CA {settings.ca_file}: trust it first)")
        for user, password in passwords.items():
            say(f"  sign in as {user} with password {password}")
        say(f"  CT study {ct_study}, ultrasound study {us_study}; Ctrl-C stops everything")
        # SIGTERM ends like Ctrl-C: through the finally blocks, which stop what was started.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()
    finally:
        stack.stop()
        idp.stop()
        if servers.started_locally:
            infra.down(list(servers.started_locally))
    return 0


if __name__ == "__main__":
    sys.exit(main())
