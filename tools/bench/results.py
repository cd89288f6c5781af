"""The bench-results.json record and its table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

DURATION_UNITS = frozenset({"s", "ms"})
ABSOLUTE_RATE_UNITS = frozenset({"checks/s"})


@dataclass(frozen=True)
class Result:
    metric: str
    value: float
    unit: str
    baseline: float
    ratio: float
    # For throughput metrics the target is a minimum ratio; for durations (unit "s", "ms") it
    # is a maximum value: "1,000,000 events verified in under 10 s"; for rates an issue states
    # absolutely (ABSOLUTE_RATE_UNITS: "5,000 checks/s on one core") a minimum value; for other
    # lower-is-better metrics (peak memory) a maximum ratio to the baseline.
    target: float | None
    higher_is_better: bool

    def verdict(self) -> str:
        if self.target is None:
            return ""
        if self.unit in DURATION_UNITS:
            return "ok" if self.value <= self.target else "ABOVE"
        if self.unit in ABSOLUTE_RATE_UNITS:
            return "ok" if self.value >= self.target else "BELOW"
        if not self.higher_is_better:
            return "ok" if self.ratio <= self.target else "ABOVE"
        return "ok" if self.ratio >= self.target else "BELOW"


def ratio(value: float, baseline: float) -> float:
    return round(value / baseline, 4) if baseline else 0.0


def report(results: list[Result], out: Path) -> None:
    print(f"{'metric':<40} {'value':>12} {'unit':<9} {'baseline':>12} {'ratio':>7} {'target':>8}")
    for r in results:
        print(
            f"{r.metric:<40} {r.value:>12.3f} {r.unit:<9} {r.baseline:>12.3f} {r.ratio:>7.3f} "
            f"{r.target!s:>8} {r.verdict()}"
        )
    out.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
