"""``dicomsafe``: the operator's command for site-wide jobs (installed with the package).

    dicomsafe backup  --to URL              dicomsafe restore --from URL [--sequence N]
    dicomsafe backups --from URL            dicomsafe tier --policy FILE [--dry-run]

Each is the same as its module (`python -m tools.backup`, `python -m tools.tiering`), which
documents its environment.
"""

from __future__ import annotations

import sys

from tools import backup, tiering


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args[0] if args else ""
    if command in ("backup", "restore"):
        return backup.main(args)
    if command == "backups":
        return backup.main(["list", *args[1:]])
    if command == "tier":
        return tiering.main(["run", *args[1:]])
    print(__doc__, file=sys.stderr)
    return 0 if command in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
