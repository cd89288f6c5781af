"""Which obligations each kind of release honours (services/gateway/access.py)."""

from __future__ import annotations

import pytest

from services.gateway.access import BREAK_GLASS, DEIDENTIFY, Verdict

pytestmark = pytest.mark.unit


def _verdict(allow: bool, *obligations: str) -> Verdict:
    return Verdict(allow, "", "", "dimse:ws1", (), frozenset(obligations), "d1", "p1")


@pytest.mark.parametrize(
    ("allow", "obligations", "identified", "unhonourable"),
    [
        (True, (), True, frozenset()),
        (True, (BREAK_GLASS,), True, frozenset()),
        # DICOMweb de-identifies; the routes that release identified data only release nothing.
        (True, (DEIDENTIFY,), False, frozenset()),
        (True, ("watermark",), False, frozenset({"watermark"})),
        (False, (), False, frozenset()),
    ],
)
def test_releases(allow: bool, obligations: tuple[str, ...], identified: bool, unhonourable: frozenset[str]) -> None:
    verdict = _verdict(allow, *obligations)
    assert verdict.releases_identified is identified
    assert verdict.unhonourable == unhonourable
