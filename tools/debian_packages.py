"""Real peers from Debian's packages (Orthanc, DCMTK), installed on first use when we are root.

A fresh machine has empty package lists: the first install fails until they are read, so one
failure is followed by ``apt-get update`` and a second try.
"""

from __future__ import annotations

import os
import shutil
import subprocess


class PackageMissing(RuntimeError):
    """Not installed and not installable here (not root, no apt-get, or apt-get failed)."""


def apt_install(*packages: str) -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise PackageMissing(f"not installed, and not root with apt-get: apt-get install {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    if subprocess.run(install, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=False).returncode:
        subprocess.run(["apt-get", "update", "-qq"], stdout=subprocess.DEVNULL, env=env, check=False)
        failed = subprocess.run(
            install, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True, check=False
        )
        if failed.returncode != 0:
            raise PackageMissing(f"apt-get could not install {' '.join(packages)}: {failed.stderr.strip()[-300:]}")


def ensure_binaries(package: str, *binaries: str) -> list[str]:
    """The paths of ``binaries``, installing ``package`` first if any is missing."""
    if any(shutil.which(b) is None for b in binaries):
        apt_install(package)
    found = [shutil.which(b) for b in binaries]
    missing = [b for b, f in zip(binaries, found, strict=True) if f is None]
    if missing:
        raise PackageMissing(f"{package} installed but {', '.join(missing)} not on PATH")
    return [f for f in found if f is not None]
