"""CPU time a process has used so far (user + system), from /proc: the benches' CPU figures."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """Raises OSError when the process is gone."""
    # After the last ")": the command name may itself hold spaces or parentheses.
    fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
