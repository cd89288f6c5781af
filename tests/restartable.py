"""Servers of a test's own, on persistent storage, that it can stop and start again on the
same data: the outage tests take down one of Kafka, OpenBao or the MongoDB-wire server while
the shared ones (``tests.servers``) keep serving everything else.

Each is the same software as the shared local servers (``tools.infra``), on free loopback
ports, logging into its own directory.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import hvac
from pymongo import MongoClient

from tools import infra
from tools.ports import free_port

START_TIMEOUT_S = 90.0


class _Process:
    name = "server"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
        with (self.workdir / f"{self.name}.log").open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def _alive_or_raise(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = (self.workdir / f"{self.name}.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")

    def stop(self) -> None:
        """SIGTERM, as Kubernetes stops a pod; waits until it is gone."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class PersistentBao(_Process):
    """OpenBao on Raft storage (a dev server would forget its keys on restart), initialised and
    unsealed through the real API; every start unseals it again, as an operator would."""

    name = "bao"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "bao.hcl"
        (workdir / "data").mkdir(exist_ok=True)
        cluster_port = free_port()
        # Raft is OpenBao's persistent storage (it has no "file" backend); one node here.
        self.config.write_text(
            f'storage "raft" {{\n  path = "{workdir / "data"}"\n  node_id = "test"\n}}\n'
            f'listener "tcp" {{\n  address = "127.0.0.1:{self.port}"\n  tls_disable = true\n}}\n'
            f'api_addr = "{self.addr}"\ncluster_addr = "http://127.0.0.1:{cluster_port}"\n',
            encoding="utf-8",
        )
        self.binary = infra.bao_binary()
        self.unseal_key = ""
        self.root_token = ""

    def start(self) -> None:
        self._spawn([self.binary, "server", f"-config={self.config}"])
        client = hvac.Client(url=self.addr)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                initialized = client.sys.is_initialized()
                break
            except Exception:
                self._alive_or_raise()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        if not initialized:
            result = client.sys.initialize(secret_shares=1, secret_threshold=1)
            self.unseal_key, self.root_token = result["keys_base64"][0], result["root_token"]
        client.sys.submit_unseal_key(self.unseal_key)
        client.token = self.root_token
        # Raft elects itself leader shortly after unseal; until then health is not 200 (no dict).
        while True:
            health = client.sys.read_health_status(method="GET")
            if isinstance(health, dict) and not health.get("sealed") and not health.get("standby"):
                return
            self._alive_or_raise()
            if time.monotonic() > deadline:
                raise TimeoutError("OpenBao did not become active")
            time.sleep(0.2)


class OwnMongo(_Process):
    """SecantusDB (MongoDB wire protocol) on persistent storage, without authentication."""

    name = "mongo"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.port = free_port()
        self.uri = f"mongodb://127.0.0.1:{self.port}/?directConnection=true"
        # An explicit empty config: no auto-discovery of config files elsewhere on the machine.
        (workdir / "secantusd.toml").write_text("", encoding="utf-8")

    def start(self) -> None:
        cmd = [
            infra.secantusd_binary(),
            "--config", str(self.workdir / "secantusd.toml"),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--storage-path", str(self.workdir / "data"),
        ]  # fmt: skip
        self._spawn(cmd)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                client: MongoClient[dict[str, object]] = MongoClient(self.uri, serverSelectionTimeoutMS=500)
                with client:
                    client.admin.command("ping")
                return
            except Exception:
                self._alive_or_raise()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)


class OwnKafka(_Process):
    """A single-node KRaft broker (plaintext) whose log survives a restart on the same port."""

    name = "kafka"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.port, controller_port = free_port(), free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self._cmd, self._env = infra.own_kafka_command(workdir, self.port, controller_port)

    def start(self) -> None:
        self._spawn(self._cmd, self._env)
        deadline = time.monotonic() + START_TIMEOUT_S
        # Ready as the shared broker is: registered, and the group coordinator answers.
        while not infra.kafka_ready(self.port):
            self._alive_or_raise()
            if time.monotonic() > deadline:
                raise TimeoutError("Kafka did not become ready")
            time.sleep(0.3)


S = TypeVar("S", PersistentBao, OwnMongo, OwnKafka)


def running_server(server: S) -> Iterator[S]:
    """For a fixture: the server started, and stopped after the test whatever happened."""
    server.start()
    try:
        yield server
    finally:
        server.stop()
