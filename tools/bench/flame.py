"""py-spy profiles of running services, summarised by where their time goes.

`py-spy record --format raw` writes one line per distinct stack, "frame;frame;...;leaf count",
root first. Each sample is charged to the innermost frame that a rule below recognises, so a
sample in pydicom counts as parsing whoever called it. Samples in our own code with no known
library below are charged to our innermost module. py-spy samples Python frames only: time
in a C extension or a system call counts against the Python frame that called it, so a share is
of wall time in that process, not of its CPU (the CPU comes from /proc, process_cpu.py).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# A sample whose leaf frame is one of these is a thread parked in a wait: not work anywhere.
IDLE = "idle (waiting for work or I/O)"
IDLE_LEAVES = ("threading.py:", "selectors.py:", "queue.py:")
# (category, substrings of a frame); the first category whose substring a frame holds wins,
# frames read from the leaf up.
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("pydicom (parse, convert values)", ("pydicom/",)),
    ("AES-GCM and the sealed format", ("cryptography/", "sealed_format.py")),
    ("object store writes (fs/S3)", ("store_fs.py", "store_s3.py", "store_tiered.py", "botocore/", "boto3/")),
    ("Kafka client (aiokafka)", ("aiokafka/", "kafka/")),
    ("MongoDB client (pymongo)", ("pymongo/", "bson/")),
    ("Vault Transit (hvac, requests)", ("hvac/", "requests/", "urllib3/")),
    ("gRPC (transport, protobuf)", ("grpc/", "cygrpc", "_pb2", "google/protobuf/")),
    ("HTTP (uvicorn, starlette, multipart)", ("uvicorn/", "starlette/", "httptools/", "multipart.py")),
    ("JSON, tokens, TLS", ("json/", "jwt/", "ssl.py")),
    ("asyncio event loop", ("asyncio/",)),
)
OTHER = "other Python (stdlib, libraries)"
# Frames of our own code with no library below them: named by module, since C work they call
# (hashlib's SHA-256, the `cryptography` AEAD, bytes copies) shows up as their own line.
OURS = re.compile(r"\((?:.*/)?((?:dicomsafe|services)/[\w/]+\.py):\d+\)")


def summarise(folded: str) -> list[tuple[str, float]]:
    """Share of samples per category, largest first."""
    counts: Counter[str] = Counter()
    for line in folded.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        counts[_category(stack.split(";"))] += int(count)
    total = sum(counts.values()) or 1
    return [(name, n / total) for name, n in counts.most_common()]


def _category(frames: list[str]) -> str:
    if frames and any(needle in frames[-1] for needle in IDLE_LEAVES):
        return IDLE
    for frame in reversed(frames):
        for name, needles in RULES:
            if any(needle in frame for needle in needles):
                return name
    for frame in reversed(frames):
        if match := OURS.search(frame):
            return match.group(1)
    return OTHER


def available() -> bool:
    return _py_spy() is not None


def _py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


@contextmanager
def recording(pids: dict[str, int], out_dir: Path, rate_hz: int = 100) -> Iterator[None]:
    """Sample each process while the body runs; leaves <name>.folded in out_dir."""
    py_spy = _py_spy()
    if py_spy is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    out_dir.mkdir(parents=True, exist_ok=True)
    recorders = {
        name: subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(rate_hz),
                "--format",
                "raw",
                "--nonblocking",  # never pause the service: the profile must not change what it shows
                "--output",
                str(out_dir / f"{name}.folded"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for name, pid in pids.items()
    }
    try:
        yield
    finally:
        for proc in recorders.values():
            proc.send_signal(2)  # SIGINT: py-spy writes what it sampled and exits
        for name, proc in recorders.items():
            _, err = proc.communicate(timeout=60)
            if proc.returncode not in (0, -2) and not (out_dir / f"{name}.folded").exists():
                raise RuntimeError(f"py-spy on {name} failed: {err.decode(errors='replace')[-300:]}")


def report(out_dir: Path, names: list[str]) -> str:
    lines = []
    for name in names:
        path = out_dir / f"{name}.folded"
        if not path.exists():
            continue
        shares = summarise(path.read_text())
        lines.append(f"{name}: " + ", ".join(f"{cat} {share:.0%}" for cat, share in shares if share >= 0.01))
    return "\n".join(lines)
