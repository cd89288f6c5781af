from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.servers import Servers, resolve
from tools.oidc_issuer import LocalIssuer, running_issuer

_TESTS = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The folder decides the marker, so `-m unit` never needs a server.
    for item in items:
        kind = Path(str(item.fspath)).relative_to(_TESTS).parts[0]
        if kind in ("unit", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    with ExitStack() as stack:
        yield resolve(stack)


@pytest.fixture
def unique() -> str:
    """A short random suffix, so tests sharing one cluster never see each other's data."""
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def idp() -> Iterator[LocalIssuer]:
    """A real OpenID Connect issuer on loopback (keys made at start) for user tokens."""
    with running_issuer() as issuer:
        yield issuer
