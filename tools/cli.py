"""``dicomsafe``: the operator's command for site-wide jobs (installed with the package).

    dicomsafe backup  --to URL              dicomsafe restore --from URL [--sequence N]
    dicomsafe backups --from URL            dicomsafe tier [run] --policy FILE [--dry-run]
    dicomsafe tier recall --study UID [--series UID] --reason TEXT [--keep-days N]

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
        # "dicomsafe tier --policy F" is a run: the job's common case needs no verb.
        rest = args[1:]
        return tiering.main(rest if rest[:1] in (["run"], ["recall"]) else ["run", *rest])
    print(__doc__, file=sys.stderr)
    return 0 if command in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
