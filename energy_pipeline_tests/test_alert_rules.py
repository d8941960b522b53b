"""Alert rule files: validation errors naming rule and field, and applying to real PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from energy_pipeline.alerts.rules import (
    RuleFileError,
    apply_rules,
    enabled_rules,
    list_rules,
    load_rules,
    parse_duration,
    parse_rules,
)
from energy_pipeline.storage import connect

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "alert_rules.yaml"


def problems_of(text: str) -> list[str]:
    with pytest.raises(RuleFileError) as info:
        parse_rules(text)
    return info.value.problems


@pytest.mark.parametrize(
    ("value", "seconds"), [(90, 90), ("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400)]
)
def test_durations(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "ten minutes", "-5m", 0, True])
def test_bad_durations_are_refused(value):
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (
            "{id: big, kind: threshold, metric: power_w_peak, operator: '>', threshold: 1}",
            "rule 'big': metric: 'power_w_peak' is not measured for scope device at window 1m",
        ),
        (
            "{id: big, kind: threshold, metric: power_w_max, operator: '=>', threshold: 1}",
            "rule 'big': operator:",
        ),
        ("{id: big, kind: threshold, metric: power_w_max, operator: '>'}", "rule 'big': threshold"),
        ("{id: silent, kind: quality, check: silent}", "rule 'silent': minutes: required"),
        (
            "{id: a, kind: anomaly, scope: device, window: 5m}",
            "rule 'a': window: device anomalies are evaluated per minute",
        ),
        ("{id: a, kind: anomaly, k: 0}", "rule 'a': k:"),
        ("{id: a, kind: anomaly, baseline: {days: 1}}", "rule 'a': baseline.days:"),
        ("{id: a, kind: anomaly, channels: [pager]}", "rule 'a': channels.0:"),
        ("{id: a, kind: anomaly, cooldown: soon}", "rule 'a': cooldown:"),
        ("{id: a, kind: anomaly, colour: red}", "rule 'a': colour: Extra inputs"),
        ("{id: a, kind: forecast}", "rule 'a': kind"),
        ("{kind: anomaly}", "rule #1: id: Field required"),
        (
            "{id: f, kind: threshold, scope: fleet, entities: [x], metric: power_w_avg, "
            "operator: '>', threshold: 1}",
            "rule 'f': entities: a fleet rule has no entity list",
        ),
    ],
)
def test_validation_errors_name_rule_and_field(rule, expected):
    found = problems_of(f"rules:\n  - {rule}\n")
    assert any(p.startswith(expected) for p in found), found


def test_every_problem_of_a_file_is_reported_and_duplicates_are_refused():
    found = problems_of(
        "rules:\n"
        "  - {id: a, kind: anomaly}\n"
        "  - {id: a, kind: anomaly}\n"
        "  - {id: b, kind: threshold, metric: nope, operator: '>', threshold: 1}\n"
    )
    assert found[0] == "rule 'a': id: defined twice"
    assert found[1].startswith("rule 'b': metric: 'nope'")


@pytest.mark.parametrize("text", ["", "rules: 3", "- a\n- b", "rules: [\n"])
def test_files_without_a_rule_list_are_refused(text):
    assert problems_of(text)


def test_quality_rules_compile_to_conditions():
    rules = {
        r.rule_id: r
        for r in parse_rules(
            "rules:\n"
            "  - {id: silent, kind: quality, check: silent, minutes: 10}\n"
            "  - {id: rej, kind: quality, check: rejected_ratio, above_percent: 5}\n"
            "  - {id: rep, kind: quality, check: reporting, below_percent: 90}\n"
            "  - {id: lag, kind: quality, check: pipeline_lag, above_seconds: 45}\n"
        )
    }
    silent = rules["silent"]
    assert (silent.metric, silent.operator, silent.threshold, silent.for_windows) == (
        "silent", "==", 1.0, 10,
    )  # fmt: skip
    assert (rules["rej"].metric, rules["rej"].operator, rules["rej"].threshold) == (
        "rejected_ratio", ">", 0.05,
    )  # fmt: skip
    assert (rules["rep"].scope, rules["rep"].operator, rules["rep"].threshold) == (
        "fleet", "<", 0.9,
    )  # fmt: skip
    assert (rules["lag"].metric, rules["lag"].threshold) == ("pipeline_lag_s", 45.0)


def test_example_file_is_valid():
    rules = load_rules(EXAMPLE)
    assert {r.kind for r in rules} == {"threshold", "anomaly", "quality"}


def rule_rows(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT rule_id, enabled, threshold, updated_at FROM energy.alert_rules "
            "ORDER BY rule_id"
        ).fetchall()


def test_apply_twice_is_the_same_and_missing_rules_are_disabled(pg_dsn):
    rules = load_rules(EXAMPLE)
    with connect(pg_dsn) as conn:
        first = apply_rules(conn, rules)
        before = rule_rows(pg_dsn)
        second = apply_rules(conn, rules)
        assert sorted(first.created) == sorted(r.rule_id for r in rules)
        assert second.created == second.updated == second.disabled == []
        assert sorted(second.unchanged) == sorted(first.created)
        assert rule_rows(pg_dsn) == before  # not even updated_at moved

        kept = [r for r in rules if r.kind != "quality"]
        third = apply_rules(conn, kept)
        gone = sorted(r.rule_id for r in rules if r.kind == "quality")
        assert third.disabled == gone
        assert {r.rule_id for r in enabled_rules(conn)} == {r.rule_id for r in kept}
        listed = {row["rule_id"]: row for row in list_rules(conn)}
        assert all(not listed[g]["enabled"] for g in gone)

        back = apply_rules(conn, rules)
        assert sorted(back.updated) == gone  # re-enabled
        assert {r.rule_id for r in enabled_rules(conn, "5m")} == {
            r.rule_id for r in rules if r.window_size == "5m"
        }


def test_apply_round_trips_every_field(pg_dsn):
    rules = load_rules(EXAMPLE)
    with connect(pg_dsn) as conn:
        apply_rules(conn, rules)
        stored = {r.rule_id: r for r in enabled_rules(conn)}
    assert stored == {r.rule_id: r for r in rules}


def test_changing_a_condition_drops_pending_streaks(pg_dsn):
    text = (
        "rules:\n  - {id: hot, kind: threshold, metric: power_w_max, operator: '>', "
        "threshold: %s, for: 3, severity: %s}\n"
    )
    with connect(pg_dsn) as conn:
        apply_rules(conn, parse_rules(text % (100, "warning")))
        conn.execute("INSERT INTO energy.alert_pending VALUES ('hot', 'd1', now(), now(), 1)")
        apply_rules(conn, parse_rules(text % (100, "critical")))  # not a condition
        assert conn.execute("SELECT count(*) FROM energy.alert_pending").fetchone() == (1,)
        apply_rules(conn, parse_rules(text % (200, "critical")))
        assert conn.execute("SELECT count(*) FROM energy.alert_pending").fetchone() == (0,)


def test_cli_apply_list_test_silence_history(pg_dsn, monkeypatch, capsys, tmp_path):
    from energy_pipeline.cli import main
    from energy_pipeline_tests.test_alert_evaluate import a_minute, put_minute, register

    monkeypatch.setenv("ENERGY_PG_DSN", pg_dsn)
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - {id: x, kind: threshold, metric: power_w_max, operator: '>'}\n")
    assert main(["alerts", "apply", str(bad)]) == 2
    assert "rule 'x': threshold: Field required" in capsys.readouterr().err

    assert main(["alerts", "apply", str(EXAMPLE)]) == 0
    assert "created: 8" in capsys.readouterr().out
    assert main(["alerts", "apply", str(EXAMPLE)]) == 0
    assert "unchanged: 8" in capsys.readouterr().out
    assert main(["alerts", "list"]) == 0
    assert "ev-charger-night-draw" in capsys.readouterr().out

    minute = a_minute(15)
    with connect(pg_dsn) as conn:
        register(conn, {"dev-0001": "h1"})
        put_minute(conn, minute, {"dev-0001": 12500.0}, {"dev-0001": "h1"})
    at = (minute + timedelta(seconds=30)).isoformat()
    assert main(["alerts", "test", "ev-charger-night-draw", "--at", at]) == 0
    out = capsys.readouterr().out
    assert "1 of 1 entities would be true" in out and "dev-0001" in out
    with connect(pg_dsn) as conn:  # a test sends and records nothing
        assert conn.execute("SELECT count(*) FROM energy.alert_outbox").fetchone() == (0,)
    assert main(["alerts", "test", "no-such-rule", "--at", at]) == 2

    assert main(["alerts", "silence", "dev-0001", "--until", "2h", "--reason", "swap"]) == 0
    assert "entity dev-0001 until" in capsys.readouterr().out
    assert main(["alerts", "silence", "device-silent", "--until", "30m"]) == 0
    assert "rule device-silent until" in capsys.readouterr().out
    with connect(pg_dsn) as conn:
        assert conn.execute(
            "SELECT rule_id, entity, reason FROM energy.alert_silences ORDER BY silence_id"
        ).fetchall() == [(None, "dev-0001", "swap"), ("device-silent", None, None)]
    assert main(["alerts", "history", "--since", "1h"]) == 0
    assert "no episodes since" in capsys.readouterr().out


ALERT_TABLES = (
    "alert_baselines",
    "alert_baseline_hours",
    "alerts",
    "alert_outbox",
    "alert_pending",
    "alert_evaluations",
    "alert_silences",
)


def snapshot(dsn: str) -> dict[str, list]:
    """Every row of the alert tables as text, in a stable order."""
    with connect(dsn) as conn:
        return {
            t: conn.execute(f"SELECT r::text FROM energy.{t} r ORDER BY 1").fetchall()
            for t in ALERT_TABLES
        }


def test_cli_test_of_an_anomaly_rule_changes_no_table(pg_dsn, monkeypatch, capsys):
    from energy_pipeline.cli import main
    from energy_pipeline_tests.test_alert_evaluate import a_minute, put_hours, put_minute, register

    monkeypatch.setenv("ENERGY_PG_DSN", pg_dsn)
    assert main(["alerts", "apply", str(EXAMPLE)]) == 0
    minute = a_minute(15)
    households = {"dev-0001": "h1"}
    with connect(pg_dsn) as conn:
        register(conn, households)
        hour = minute.replace(minute=0)
        put_hours(
            conn, hour, {"dev-0001": [100.0, 110.0, 90.0, 105.0, 95.0, 100.0, 98.0]}, households
        )
        put_minute(conn, minute, {"dev-0001": 12500.0}, households)
    before = snapshot(pg_dsn)
    capsys.readouterr()
    assert main(["alerts", "test", "device-draw-anomaly", "--at", minute.isoformat()]) == 0
    out = capsys.readouterr().out
    assert "1 of 1 entities would be true" in out and "dev-0001" in out
    assert snapshot(pg_dsn) == before
    assert before["alert_baselines"] == []  # nothing was cached by the test


def test_cli_a_time_that_does_not_parse_is_a_clear_error(pg_dsn, monkeypatch, capsys):
    from energy_pipeline.cli import main

    monkeypatch.setenv("ENERGY_PG_DSN", pg_dsn)
    assert main(["alerts", "apply", str(EXAMPLE)]) == 0
    for args in (
        ["test", "device-draw-anomaly", "--at", "yesterday noon"],
        ["silence", "device-silent", "--until", "tomorrow"],
        ["history", "--since", "last week"],
    ):
        capsys.readouterr()
        assert main(["alerts", *args]) == 2, args
        err = capsys.readouterr().err
        assert "is neither an ISO time" in err and "Traceback" not in err


def test_cli_silence_warns_when_the_name_is_neither_a_rule_nor_an_entity(
    pg_dsn, monkeypatch, capsys
):
    from energy_pipeline.cli import main
    from energy_pipeline_tests.test_alert_evaluate import register

    monkeypatch.setenv("ENERGY_PG_DSN", pg_dsn)
    assert main(["alerts", "apply", str(EXAMPLE)]) == 0
    with connect(pg_dsn) as conn:
        register(conn, {"dev-0001": "h1"})
    capsys.readouterr()
    assert main(["alerts", "silence", "device-silnet", "--until", "2h"]) == 0
    captured = capsys.readouterr()
    for text in (captured.out, captured.err):
        assert "'device-silnet' is neither a rule nor a known device" in text
        assert "did you mean the rule 'device-silent'" in text
    for known in ("dev-0001", "h1", "fleet"):
        assert main(["alerts", "silence", known, "--until", "2h"]) == 0
        captured = capsys.readouterr()
        assert f"entity {known} until" in captured.out
        assert "warning" not in captured.out + captured.err
