"""The tiering policy as data: which rule an instance falls under, and when it is due."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from tools.tiering import Policy, PolicyError, Rule, load_policy

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
NOW = dt.datetime(2026, 12, 6, 12, 0, tzinfo=dt.UTC)


def _ago(days: float) -> dt.datetime:
    return NOW - dt.timedelta(days=days)


def test_the_shipped_policy_loads() -> None:
    policy = load_policy(REPO / "deploy" / "policy" / "tiering.toml")
    assert policy.rule_for("CT").name == "default"
    assert policy.rule_for("MG").name == "modality.MG"
    assert policy.rule_for("MG").after_days is not None
    assert policy.default.after_days is not None and policy.default.idle_days is not None


def test_age_and_idle_each_make_an_instance_due() -> None:
    rule = Rule("default", after_days=365, idle_days=90)
    assert rule.why_due(_ago(400), _ago(1), NOW) == "age"  # read yesterday, still old enough
    assert rule.why_due(_ago(100), _ago(95), NOW) == "idle"
    assert rule.why_due(_ago(100), _ago(10), NOW) == ""  # young and read lately
    assert rule.why_due(_ago(89), _ago(89), NOW) == ""


def test_a_rule_with_neither_keeps_a_modality_hot() -> None:
    policy = Policy(Rule("default", after_days=0), {"MR": Rule("modality.MR")})
    assert policy.rule_for("MR").why_due(_ago(10_000), _ago(10_000), NOW) == ""
    assert policy.rule_for("CT").why_due(_ago(0), _ago(0), NOW) == "age"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[default]\narchive_after_days = -1\n", "default.archive_after_days must be a number of days >= 0"),
        ("[default]\narchive_idle_days = true\n", "default.archive_idle_days must be a number of days >= 0"),
        ("[default]\narchive_after_day = 3\n", "default: unknown settings ['archive_after_day']"),
        ("[defaults]\narchive_after_days = 3\n", "unknown policy sections: ['defaults']"),
    ],
)
def test_a_mistyped_policy_is_refused_not_guessed(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "tiering.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PolicyError) as raised:
        load_policy(path)
    assert str(raised.value) == error


def test_modality_names_are_case_insensitive(tmp_path: Path) -> None:
    path = tmp_path / "tiering.toml"
    path.write_text("[modality.us]\narchive_idle_days = 30\n", encoding="utf-8")
    policy = load_policy(path)
    assert policy.rule_for("US") == Rule("modality.US", None, 30.0)
    assert policy.default == Rule("default")
