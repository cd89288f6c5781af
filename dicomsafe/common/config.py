"""Reading configuration from the environment, with secrets from files."""

from __future__ import annotations

import os
from pathlib import Path


class ConfigError(ValueError):
    """A required setting is missing or malformed."""


def env_str(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if value is None or value == "":
        raise ConfigError(f"environment variable {name} is required")
    return value


def env_opt(name: str, default: str = "") -> str:
    """An optional setting; empty means "not set"."""
    return os.environ.get(name, default)


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"environment variable {name} must be an integer") from exc


def env_secret(name: str, default: str | None = None) -> str | None:
    """A secret from ``NAME`` or from the file named by ``NAME_FILE``.

    Files are preferred because Kubernetes mounts secrets as files, and a value in a
    file does not show up in ``/proc/<pid>/environ`` or crash dumps.
    """
    path = os.environ.get(f"{name}_FILE")
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            # The path is not secret; the contents are never echoed.
            raise ConfigError(f"cannot read {name}_FILE ({path}): {exc.strerror}") from exc
    value = os.environ.get(name)
    return value if value else default


def host_port(value: str, default_host: str = "") -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` (then ``default_host``) as (host, port).

    One parser for every bind address and target, so each refuses the same malformed values
    with the same message instead of failing later inside a server library.
    """
    host, sep, port = value.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{value!r} is not host:port")
    host = host.strip("[]") or default_host
    if not host:
        raise ConfigError(f"{value!r} needs a host")
    return host, int(port)
