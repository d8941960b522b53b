"""Vectorised rule evaluation against rollups in a real PostgreSQL: thresholds per scope,
entity lists, quality values, anomalies against the trailing baseline, the 5-minute grain."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import psycopg
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from energy_pipeline.alerts.evaluate import evaluate, evaluate_window, rules_frame
from energy_pipeline.alerts.rules import Rule, parse_rules
from energy_pipeline.devtools.bench.alerts import measure
from energy_pipeline.scheduling import floor_minute
from energy_pipeline.storage import connect, create_partitions

DEVICE = ("device_id", "household_id", "sample_count", "power_w_avg", "energy_wh_sum")


def a_minute(minutes_ago: int = 30) -> datetime:
    """A recent minute; its day's partitions are created by the helpers that write rows (the
    template database only has the days around its creation, which may be another day)."""
    return floor_minute(datetime.now(UTC)) - timedelta(minutes=minutes_ago)


def register(conn: psycopg.Connection, devices: dict[str, str]) -> None:
    """Register devices (device_id → household_id)."""
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO energy.devices (device_id, household_id) VALUES (%s, %s)",
            list(devices.items()),
        )


def put_minute(
    conn: psycopg.Connection,
    minute: datetime,
    power: dict[str, float],
    households: dict[str, str],
    *,
    rejected: dict[str, int] | None = None,
    lag_s: float = 5.0,
) -> None:
    """Replace `minute`'s device rows: mean power per device (max 10 % above it), 60 samples,
    energy consistent with the power; and its ledger row, rolled up `lag_s` after its close."""
    rejected = rejected or {}
    create_partitions(conn, "device_rollup_1m", minute.date(), minute.date())
    rows = [
        (d, minute, households[d], 60, p, p * 0.9, p * 1.1, p / 60, rejected.get(d, 0))
        for d, p in power.items()
    ]
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("DELETE FROM energy.device_rollup_1m WHERE bucket = %s", (minute,))
        cur.execute("DELETE FROM energy.rollup_minutes WHERE bucket = %s", (minute,))
        cur.executemany(
            "INSERT INTO energy.device_rollup_1m (device_id, bucket, household_id, sample_count, "
            "power_w_avg, power_w_min, power_w_max, energy_wh_sum, rejected_count, computed_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, now())",
            rows,
        )
        cur.execute(
            "INSERT INTO energy.rollup_minutes (bucket, points_read, power_w_points, "
            "energy_wh_points, duplicates_dropped, rejected, devices, computed_at) "
            "VALUES (%s, 0, 0, 0, 0, 0, %s, %s)",
            (minute, len(rows), minute + timedelta(minutes=1, seconds=lag_s)),
        )


def put_hours(
    conn: psycopg.Connection, hour: datetime, power: dict[str, list[float]], households: dict
) -> None:
    """device_rollup_1h rows at `hour` one, two, … days back: power[device][i] is i+1 days back."""
    days = max(len(v) for v in power.values())
    create_partitions(conn, "device_rollup_1h", (hour - timedelta(days=days)).date(), hour.date())
    rows = [
        (d, hour - timedelta(days=i + 1), households[d], 3600, p, p, p, p)
        for d, values in power.items()
        for i, p in enumerate(values)
    ]
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO energy.device_rollup_1h (device_id, bucket, household_id, sample_count, "
            "power_w_avg, power_w_min, power_w_max, energy_wh_sum, computed_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, now())",
            rows,
        )


def firing(rules: list[Rule], conn: psycopg.Connection, grain: str, start: datetime) -> dict:
    """{(rule_id, entity): value} of the breached conditions of a window."""
    ev = evaluate_window(conn, rules, grain, start)
    return {(r["rule_id"], r["entity"]): r["value"] for r in ev.breached.iter_rows(named=True)}


HOUSEHOLDS = {"d1": "h1", "d2": "h1", "d3": "h2", "d4": "h2"}


def test_thresholds_per_scope_entity_lists_and_quality(pg_dsn):
    rules = parse_rules(
        "rules:\n"
        "  - {id: dev, kind: threshold, metric: power_w_max, operator: '>', threshold: 1000}\n"
        "  - {id: only-d4, kind: threshold, entities: [d4], metric: power_w_avg,"
        " operator: '>=', threshold: 10}\n"
        "  - {id: hh, kind: threshold, scope: household, metric: power_w_avg, operator: '>',"
        " threshold: 1500}\n"
        "  - {id: fleet, kind: threshold, scope: fleet, metric: energy_wh_sum, operator: '<',"
        " threshold: 1}\n"
        "  - {id: silent, kind: quality, check: silent, minutes: 1}\n"
        "  - {id: rejected, kind: quality, check: rejected_ratio, above_percent: 10}\n"
        "  - {id: reporting, kind: quality, check: reporting, below_percent: 80}\n"
        "  - {id: lag, kind: quality, check: pipeline_lag, above_seconds: 30}\n"
    )
    minute = a_minute()
    with connect(pg_dsn) as conn:
        register(conn, HOUSEHOLDS)
        put_minute(
            conn,
            minute,
            {"d1": 1200.0, "d2": 500.0, "d4": 20.0},
            HOUSEHOLDS,
            rejected={"d2": 20},
            lag_s=42.5,
        )
        found = firing(rules, conn, "1m", minute)
    assert found == {
        ("dev", "d1"): pytest.approx(1320.0),  # power_w_max is 10 % above the mean
        ("only-d4", "d4"): 20.0,
        ("hh", "h1"): 1700.0,  # the household's draw: the sum of its devices' mean power
        ("silent", "d3"): 1.0,  # registered, no row this minute
        ("rejected", "d2"): pytest.approx(20 / 80),
        ("reporting", "fleet"): 0.75,
        ("lag", "fleet"): 42.5,
    }


def test_five_minute_rules_read_household_rollup_5m(pg_dsn):
    rules = parse_rules(
        "rules:\n"
        "  - {id: peak, kind: threshold, scope: household, window: 5m, metric: power_w_peak,"
        " operator: '>', threshold: 9000}\n"
        "  - {id: fleet5, kind: threshold, scope: fleet, window: 5m, metric: power_w_avg,"
        " operator: '>', threshold: 10000}\n"
        "  - {id: minute, kind: threshold, metric: power_w_avg, operator: '>', threshold: 0}\n"
    )
    minute = a_minute(40)  # read once: two readings may straddle a minute
    window = minute.replace(minute=minute.minute // 5 * 5)
    with connect(pg_dsn) as conn:
        create_partitions(conn, "household_rollup_5m", window.date(), window.date())
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO energy.household_rollup_5m (household_id, bucket, device_count, "
                "sample_count, energy_wh_sum, power_w_avg, power_w_peak, computed_at) "
                "VALUES (%s, %s, 2, 600, %s, %s, %s, now())",
                [("h1", window, 500.0, 6000.0, 9500.0), ("h2", window, 100.0, 4500.0, 5000.0)],
            )
        found = firing(rules, conn, "5m", window)
    assert found == {("peak", "h1"): 9500.0, ("fleet5", "fleet"): 10500.0}


ANOMALY = (
    "rules:\n"
    "  - {id: spike, kind: anomaly, scope: %s, k: 3,"
    " baseline: {days: 7, min_history: 4, floor_w: 20, floor_ratio: 0.1}}\n"
)


def test_anomaly_fires_on_a_spike_but_not_on_flat_new_or_noisy_devices(pg_dsn):
    rules = parse_rules(ANOMALY % "device")
    minute = a_minute(30)
    hour = minute.replace(minute=0)
    devices = {"flat": "h1", "new": "h1", "spiky": "h2", "noisy": "h2", "idle": "h3"}
    with connect(pg_dsn) as conn:
        register(conn, devices)
        put_hours(
            conn,
            hour,
            {
                "flat": [100.0] * 7,  # zero variance: the floor keeps z finite
                "new": [100.0] * 3,  # below min_history
                "spiky": [100.0, 104.0, 96.0, 101.0, 99.0, 100.0, 100.0],
                "noisy": [0.0, 2.0, 1.0, 3.0, 0.0, 1.0, 2.0],  # tiny mean: the 20 W floor
                "idle": [0.0] * 7,
            },
            devices,
        )
        put_minute(
            conn,
            minute,
            {"flat": 105.0, "new": 5000.0, "spiky": 900.0, "noisy": 40.0, "idle": 0.0},
            devices,
        )
        ev = evaluate_window(conn, rules, "1m", minute)
    by_entity = {r["entity"]: r for r in ev.results.iter_rows(named=True)}
    assert {r["entity"] for r in ev.breached.iter_rows(named=True)} == {"spiky"}
    assert by_entity["spiky"]["z"] == pytest.approx((900 - 100) / 20)
    assert by_entity["spiky"]["baseline_n"] == 7
    assert by_entity["flat"]["z"] == pytest.approx(0.25)  # (105 - 100) / max(0, 20, 10)
    assert by_entity["new"]["baseline_n"] == 3 and not by_entity["new"]["breached"]
    assert by_entity["idle"]["z"] == 0.0


def test_household_anomaly_uses_the_sum_of_its_devices_hours(pg_dsn):
    rules = parse_rules(ANOMALY % "household")
    minute = a_minute(30)
    devices = {"a": "h1", "b": "h1"}
    with connect(pg_dsn) as conn:
        register(conn, devices)
        put_hours(
            conn,
            minute.replace(minute=0),
            {"a": [200.0, 210.0, 190.0, 200.0], "b": [300.0, 300.0, 300.0, 300.0]},
            devices,
        )
        put_minute(conn, minute, {"a": 1500.0, "b": 300.0}, devices)
        ev = evaluate_window(conn, rules, "1m", minute)
    row = ev.results.row(0, named=True)
    assert (row["entity"], row["baseline_mean"], row["baseline_n"]) == ("h1", 500.0, 4)
    assert row["breached"] and row["z"] == pytest.approx((1800 - 500) / 50)


def test_measure_reports_seconds_per_minute_for_a_small_fleet(pg_dsn):
    figures = measure(pg_dsn, devices=200, rules=20, minutes=2)
    assert figures["devices"] == 200 and figures["rules"] == 20
    assert figures["pairs_evaluated"] > 200 * 10
    assert 0 < figures["seconds_per_minute_median"] <= figures["seconds_per_minute_max"]
    assert isinstance(figures["per_stage_median"], dict)
    assert set(pl.DataFrame(figures["breached_per_minute"]).columns) == {"minute", "breached"}


OPERATORS = {
    ">": lambda v, t: v > t,
    ">=": lambda v, t: v >= t,
    "<": lambda v, t: v < t,
    "<=": lambda v, t: v <= t,
    "==": lambda v, t: v == t,
    "!=": lambda v, t: v != t,
}
values_strategy = st.lists(
    st.one_of(st.none(), st.sampled_from([0.0, 5.0, 10.0, 12.5, 100.0])), min_size=1, max_size=8
)
rules_strategy = st.lists(
    st.tuples(
        st.sampled_from(sorted(OPERATORS)),
        st.sampled_from([0.0, 5.0, 10.0, 50.0]),
        st.one_of(st.none(), st.lists(st.integers(0, 9), min_size=1, max_size=3)),
    ),
    min_size=1,
    max_size=6,
)


@hypothesis_settings(max_examples=60, deadline=None)
@given(values=values_strategy, rules=rules_strategy)
def test_vectorised_thresholds_match_a_row_by_row_reading(values, rules):
    frame = pl.DataFrame(
        {
            "entity_type": ["device"] * len(values),
            "entity": [f"d{i}" for i in range(len(values))],
            "metric": ["power_w_avg"] * len(values),
            "value": values,
        },
        schema={"entity_type": pl.String, "entity": pl.String, "metric": pl.String,
                "value": pl.Float64},
    )  # fmt: skip
    stored = [
        Rule(
            rule_id=f"r{i}", name=f"r{i}", kind="threshold", scope="device",
            metric="power_w_avg", window_size="1m", operator=op, threshold=t, severity="info",
            channels=["log"], entity_ids=None if ids is None else [f"d{j}" for j in ids],
        )
        for i, (op, t, ids) in enumerate(rules)
    ]  # fmt: skip
    found = evaluate(frame, rules_frame(stored))
    got = {(r["rule_id"], r["entity"]): r["breached"] for r in found.iter_rows(named=True)}
    expected = {
        (rule.rule_id, f"d{i}"): value is not None
        and OPERATORS[rule.operator](value, rule.threshold)
        for rule in stored
        for i, value in enumerate(values)
        if rule.entity_ids is None or f"d{i}" in rule.entity_ids
    }
    assert got == expected


def test_helpers_work_on_a_day_the_template_has_no_partitions_for(pg_dsn):
    # As after 00:00 UTC when the template was made the day before: the helpers create the day.
    rules = parse_rules(
        "rules:\n  - {id: hot, kind: threshold, metric: power_w_avg, operator: '>',"
        " threshold: 1000}\n"
    )
    minute = a_minute(30) - timedelta(days=20)
    with connect(pg_dsn) as conn:
        register(conn, {"d1": "h1"})
        put_minute(conn, minute, {"d1": 1500.0}, {"d1": "h1"})
        assert firing(rules, conn, "1m", minute) == {("hot", "d1"): 1500.0}
