"""A DICOMweb client of the stack's gateway, as a hospital's client would hold one: the
stack's CA pinned, the caller's access token on every request."""

from __future__ import annotations

import requests
from dicomweb_client.api import DICOMwebClient

from tools.stack import Stack


def gateway_client(stack: Stack, token: str | None, replica: int = 0) -> DICOMwebClient:
    session = requests.Session()
    # Otherwise REQUESTS_CA_BUNDLE from the environment overrides the pinned CA (requests #3829).
    session.trust_env = False
    session.verify = str(stack.settings.ca_file)
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    return DICOMwebClient(stack.settings.dicomweb_url_of(replica), session=session)
