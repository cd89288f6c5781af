"""One parser for every host:port setting."""

from __future__ import annotations

import pytest

from dicomsafe.common.config import ConfigError, host_port


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:11112", ("127.0.0.1", 11112)),
        ("[fd00::1]:104", ("fd00::1", 104)),
        (":8443", ("0.0.0.0", 8443)),
        (" pacs.hospital.example:11112 ", ("pacs.hospital.example", 11112)),
    ],
)
def test_valid_values(value: str, expected: tuple[str, int]) -> None:
    assert host_port(value, "0.0.0.0") == expected


@pytest.mark.parametrize("value", ["", "host", "host:", "host:port", "host:0", "host:70000", ":104"])
def test_malformed_values_are_configuration_errors(value: str) -> None:
    with pytest.raises(ConfigError):
        host_port(value)
