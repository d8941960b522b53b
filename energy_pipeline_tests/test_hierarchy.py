"""The hierarchy's SQL core against a real PostgreSQL, and its window planner (no servers)."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from energy_pipeline import storage
from energy_pipeline.hierarchy import (
    DEVICE_1H,
    HOUSEHOLD_5M,
    PendingWindow,
    WindowPlanSettings,
    WindowRun,
    coverage,
    pending_windows,
    plan_windows,
    replace_device_1h,
    replace_household_5m,
    sum_checks,
)
from energy_pipeline_tests.helpers import close

MINUTE = timedelta(minutes=1)
FIVE = timedelta(minutes=5)
HOUR = timedelta(hours=1)
MINUTE_COLS = (
    "device_id",
    "bucket",
    "household_id",
    "sample_count",
    "power_w_avg",
    "power_w_min",
    "power_w_max",
    "energy_wh_sum",
    "rejected_count",
)


def closed_hour(hours_ago: int = 2) -> datetime:
    """The start of a closed UTC hour inside the partitions the migration creates."""
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    return now - timedelta(hours=hours_ago)


def insert_minutes(conn: psycopg.Connection, rows: list[dict], computed_at: datetime) -> None:
    """Minute rows plus one ledger row per distinct minute, as the minute asset leaves them."""
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            f"INSERT INTO energy.device_rollup_1m ({', '.join(MINUTE_COLS)}, computed_at) "
            f"VALUES ({', '.join(['%s'] * (len(MINUTE_COLS) + 1))})",
            [(*(r[c] for c in MINUTE_COLS), computed_at) for r in rows],
        )
        cur.executemany(
            "INSERT INTO energy.rollup_minutes (bucket, points_read, power_w_points, "
            "energy_wh_points, duplicates_dropped, rejected, devices, computed_at) "
            "VALUES (%s, 0, 0, 0, 0, 0, 0, %s) ON CONFLICT (bucket) DO NOTHING",
            [(m, computed_at) for m in sorted({r["bucket"] for r in rows})],
        )


def synthetic_minutes(first: datetime, minutes: int, seed: int = 3) -> list[dict]:
    """Messy minute rows: devices missing minutes, all-rejected minutes, tags that change."""
    rng = random.Random(seed)
    rows = []
    for i in range(minutes):
        minute = first + i * MINUTE
        for d in range(9):
            if rng.random() < 0.2:
                continue  # the device sent nothing this minute
            samples = 0 if rng.random() < 0.1 else rng.randint(1, 60)
            powers = [rng.uniform(0, 3000) for _ in range(samples)]
            rows.append(
                {
                    "device_id": f"dev-{d}",
                    "bucket": minute,
                    # dev-7 is unregistered and its tag moves between households
                    "household_id": f"hh-{rng.randint(0, 2)}" if d in (6, 7) else f"hh-{d % 3}",
                    "sample_count": samples,
                    "power_w_avg": sum(powers) / samples if samples else None,
                    "power_w_min": min(powers) if samples else None,
                    "power_w_max": max(powers) if samples else None,
                    "energy_wh_sum": sum(p / 3600 for p in powers),
                    "rejected_count": rng.randint(0, 3) if samples < 60 else 0,
                }
            )
    return rows


REGISTRY = {f"dev-{d}": f"hh-{d % 3}" for d in range(7)}  # dev-7 and dev-8 unregistered


def register(conn: psycopg.Connection) -> None:
    import polars as pl

    storage.upsert_devices(
        conn,
        pl.DataFrame({"device_id": list(REGISTRY), "household_id": list(REGISTRY.values())}),
    )


def household_of(row: dict) -> str:
    return REGISTRY.get(row["device_id"], row["household_id"])


def expected_household_5m(rows: list[dict]) -> dict[tuple, dict]:
    """Plain-Python household × 5-minute rollup (the documented semantics)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        start = r["bucket"] - timedelta(minutes=r["bucket"].minute % 5)
        groups[(household_of(r), start)].append(r)
    out = {}
    for key, members in groups.items():
        draw: dict[datetime, list[float]] = defaultdict(list)
        for r in members:
            if r["power_w_avg"] is not None:
                draw[r["bucket"]].append(r["power_w_avg"])
        totals = [sum(v) for v in draw.values()]
        out[key] = {
            "device_count": len({r["device_id"] for r in members}),
            "sample_count": sum(r["sample_count"] for r in members),
            "energy_wh_sum": sum(r["energy_wh_sum"] for r in members),
            "power_w_avg": sum(totals) / len(totals) if totals else None,
            "power_w_peak": max(totals) if totals else None,
        }
    return out


def expected_device_1h(rows: list[dict]) -> dict[tuple, dict]:
    """Plain-Python device × hour rollup."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["device_id"], r["bucket"].replace(minute=0))].append(r)
    out = {}
    for key, members in groups.items():
        samples = sum(r["sample_count"] for r in members)
        valid = [r for r in members if r["sample_count"]]
        newest = max(members, key=lambda r: r["bucket"])
        out[key] = {
            "household_id": household_of(newest),
            "sample_count": samples,
            "power_w_avg": (
                sum(r["power_w_avg"] * r["sample_count"] for r in valid) / samples
                if samples
                else None
            ),
            "power_w_min": min((r["power_w_min"] for r in valid), default=None),
            "power_w_max": max((r["power_w_max"] for r in valid), default=None),
            "energy_wh_sum": sum(r["energy_wh_sum"] for r in members),
            "rejected_count": sum(r["rejected_count"] for r in members),
        }
    return out


def fetch(conn: psycopg.Connection, table: str, key: str, cols: list[str]) -> dict[tuple, dict]:
    rows = conn.execute(
        f"SELECT {key}, bucket, {', '.join(cols)} FROM energy.{table} ORDER BY 1, 2"
    ).fetchall()
    return {(r[0], r[1]): dict(zip(cols, r[2:], strict=True)) for r in rows}


def assert_same(got: dict[tuple, dict], want: dict[tuple, dict]) -> None:
    assert set(got) == set(want)
    for key, row in want.items():
        for col, value in row.items():
            if isinstance(value, float) or value is None:
                assert close(got[key][col], value), (key, col, got[key][col], value)
            else:
                assert got[key][col] == value, (key, col)


HOUSEHOLD_COLS = ["device_count", "sample_count", "energy_wh_sum", "power_w_avg", "power_w_peak"]
DEVICE_COLS = [
    "household_id",
    "sample_count",
    "power_w_avg",
    "power_w_min",
    "power_w_max",
    "energy_wh_sum",
    "rejected_count",
]


@pytest.fixture
def conn(pg_dsn: str):
    with storage.connect(pg_dsn) as c:
        register(c)
        yield c


def test_household_5m_equals_independent_computation(conn):
    hour = closed_hour()
    rows = synthetic_minutes(hour, 60)
    insert_minutes(conn, rows, hour + 2 * HOUR)

    written = replace_household_5m(conn, hour, hour + HOUR, datetime.now(UTC))

    want = expected_household_5m(rows)
    assert_same(fetch(conn, "household_rollup_5m", "household_id", HOUSEHOLD_COLS), want)
    assert written.rows_written == len(want)
    assert (written.windows, written.minutes_covered, written.minutes_expected) == (12, 60, 60)
    # an all-rejected device minute counts as a device with a row, but adds no draw
    assert any(r["sample_count"] == 0 for r in rows)


def test_device_1h_equals_independent_computation(conn):
    hour = closed_hour()
    rows = synthetic_minutes(hour, 60, seed=5) + synthetic_minutes(hour + HOUR, 30, seed=6)
    insert_minutes(conn, rows, hour + 3 * HOUR)

    written = replace_device_1h(conn, hour, hour + 2 * HOUR, datetime.now(UTC))

    got = fetch(conn, "device_rollup_1h", "device_id", DEVICE_COLS)
    assert_same(got, expected_device_1h(rows))
    # the registered household wins over the minute's tag; an unregistered device keeps its
    # newest minute's tag
    assert {got[k]["household_id"] for k in got if k[0] == "dev-6"} == {"hh-0"}
    assert (written.windows, written.minutes_covered, written.minutes_expected) == (2, 90, 120)


@pytest.mark.parametrize("grain", [HOUSEHOLD_5M, DEVICE_1H])
def test_rewrite_is_idempotent_and_replaces_exactly(conn, grain):
    hour = closed_hour()
    rows = synthetic_minutes(hour - HOUR, 180)
    insert_minutes(conn, rows, hour + 2 * HOUR)
    key, cols = (
        ("household_id", HOUSEHOLD_COLS) if grain == HOUSEHOLD_5M else ("device_id", DEVICE_COLS)
    )
    write = replace_household_5m if grain == HOUSEHOLD_5M else replace_device_1h
    write(conn, hour - HOUR, hour + 2 * HOUR, datetime.now(UTC))
    first = fetch(conn, grain, key, cols)

    write(conn, hour, hour + HOUR, datetime.now(UTC))
    assert fetch(conn, grain, key, cols) == first  # re-running gives the same rows

    # a device's minutes disappear from the middle hour: its coarse rows there go, nothing else
    conn.execute(
        "DELETE FROM energy.device_rollup_1m WHERE device_id = 'dev-7' "
        "AND bucket >= %s AND bucket < %s",
        (hour, hour + HOUR),
    )
    write(conn, hour, hour + HOUR, datetime.now(UTC))
    after = fetch(conn, grain, key, cols)
    inside = [k for k in after if hour <= k[1] < hour + HOUR]
    outside = {k: v for k, v in after.items() if not hour <= k[1] < hour + HOUR}
    assert outside == {k: v for k, v in first.items() if not hour <= k[1] < hour + HOUR}
    remaining = [r for r in rows if not (r["device_id"] == "dev-7" and hour <= r["bucket"])]
    expected = expected_household_5m if grain == HOUSEHOLD_5M else expected_device_1h
    want = {k: v for k, v in expected(remaining).items() if hour <= k[1] < hour + HOUR}
    assert_same({k: after[k] for k in inside}, want)
    windows = conn.execute(
        "SELECT count(*) FROM energy.rollup_windows WHERE grain = %s", (grain,)
    ).fetchone()
    assert windows == ((36,) if grain == HOUSEHOLD_5M else (3,))


def _mover_minutes(hour: datetime) -> list[dict]:
    """mover (registered to hh-a) and stayer (hh-a): 10 Wh a minute each for two hours."""
    return [
        {"device_id": d, "bucket": hour + i * MINUTE, "household_id": "hh-a", "sample_count": 60,
         "power_w_avg": 600.0, "power_w_min": 600.0, "power_w_max": 600.0,
         "energy_wh_sum": 10.0, "rejected_count": 0}
        for i in range(120) for d in ("mover", "stayer")
    ]  # fmt: skip


def test_a_device_that_moves_household_keeps_its_history_when_old_windows_recompute(pg_dsn):
    import polars as pl

    hour = closed_hour(3)
    with storage.connect(pg_dsn) as conn:
        devices = pl.DataFrame({"device_id": ["mover", "stayer"], "household_id": ["hh-a", "hh-a"]})
        storage.upsert_devices(conn, devices)
        insert_minutes(conn, _mover_minutes(hour), hour + 3 * HOUR)
        replace_household_5m(conn, hour, hour + 2 * HOUR, datetime.now(UTC))
        replace_device_1h(conn, hour, hour + 2 * HOUR, datetime.now(UTC))
        before = fetch(conn, HOUSEHOLD_5M, "household_id", HOUSEHOLD_COLS)

        # The registry moves the device now: its past stays with hh-a, window by window.
        moved = devices.with_columns(pl.Series("household_id", ["hh-b", "hh-a"]))
        for _ in range(2):  # importing the same registry again records nothing more
            storage.upsert_devices(conn, moved)
        history = conn.execute(
            "SELECT device_id, household_id, valid_from = 'epoch' "
            "FROM energy.device_households ORDER BY device_id, valid_from"
        ).fetchall()
        assert history == [
            ("mover", "hh-a", True),
            ("mover", "hh-b", False),
            ("stayer", "hh-a", True),
        ]
        replace_household_5m(conn, hour, hour + 5 * MINUTE, datetime.now(UTC))
        assert fetch(conn, HOUSEHOLD_5M, "household_id", HOUSEHOLD_COLS) == before

        # A move dated in the past (written by hand) splits the two hours at that time.
        conn.execute(
            "UPDATE energy.device_households SET valid_from = %s WHERE household_id = 'hh-b'",
            (hour + HOUR,),
        )
        replace_household_5m(conn, hour, hour + 2 * HOUR, datetime.now(UTC))
        replace_device_1h(conn, hour, hour + 2 * HOUR, datetime.now(UTC))
        energy = conn.execute(
            "SELECT household_id, bucket >= %s, sum(energy_wh_sum) FROM energy.household_rollup_5m "
            "GROUP BY 1, 2 ORDER BY 1, 2",
            (hour + HOUR,),
        ).fetchall()
        assert energy == [("hh-a", False, 1200.0), ("hh-a", True, 600.0), ("hh-b", True, 600.0)]
        hours = conn.execute(
            "SELECT bucket, household_id FROM energy.device_rollup_1h WHERE device_id = 'mover' "
            "ORDER BY bucket"
        ).fetchall()
        assert hours == [(hour, "hh-a"), (hour + HOUR, "hh-b")]


def test_window_ledger_records_coverage_and_newest_minute(conn):
    hour = closed_hour()
    rows = synthetic_minutes(hour, 5)
    insert_minutes(conn, [r for r in rows if r["bucket"] != hour + 2 * MINUTE], hour + HOUR)
    newer = hour + 2 * HOUR
    conn.execute(
        "UPDATE energy.rollup_minutes SET computed_at = %s WHERE bucket = %s",
        (newer, hour + 3 * MINUTE),
    )
    replace_household_5m(conn, hour, hour + 2 * FIVE, datetime.now(UTC))

    rows_now = conn.execute(
        "SELECT bucket, minutes_covered, minutes_expected, source_computed_at "
        "FROM energy.rollup_windows WHERE grain = %s ORDER BY bucket",
        (HOUSEHOLD_5M,),
    ).fetchall()
    assert rows_now == [(hour, 4, 5, newer), (hour + FIVE, 0, 5, None)]
    cov = coverage(conn, HOUSEHOLD_5M, hour, hour + 2 * FIVE)
    assert [(c.minutes_covered, c.complete) for c in cov] == [(4, False), (0, False)]
    assert pending_windows(conn, HOUSEHOLD_5M, hour, hour + HOUR) == []

    # a recomputed minute makes exactly its window pending
    later = hour + 3 * HOUR
    conn.execute(
        "UPDATE energy.rollup_minutes SET computed_at = %s WHERE bucket = %s", (later, hour)
    )
    pending = pending_windows(conn, HOUSEHOLD_5M, hour, hour + HOUR)
    assert [(p.bucket, p.minutes_covered, p.newest_minute_computed_at) for p in pending] == [
        (hour, 4, later)
    ]


@pytest.mark.parametrize(("column", "added"), [("energy_wh_sum", 0.5), ("sample_count", 3)])
@pytest.mark.parametrize("grain", [HOUSEHOLD_5M, DEVICE_1H])
def test_sum_checks_fail_on_a_tampered_minute_row(conn, grain, column, added):
    hour = closed_hour()
    rows = synthetic_minutes(hour, 60)
    insert_minutes(conn, rows, hour + HOUR)
    write = replace_household_5m if grain == HOUSEHOLD_5M else replace_device_1h
    write(conn, hour, hour + HOUR, datetime.now(UTC))
    assert all(c.passed for c in sum_checks(conn, grain, hour, hour + HOUR))

    tampered = rows[len(rows) // 2]
    conn.execute(
        f"UPDATE energy.device_rollup_1m SET {column} = {column} + %s "
        "WHERE device_id = %s AND bucket = %s",
        (added, tampered["device_id"], tampered["bucket"]),
    )
    checks = sum_checks(conn, grain, hour, hour + HOUR)
    failed = [c for c in checks if not c.passed]
    assert len(failed) == 1
    assert (
        failed[0].bucket
        <= tampered["bucket"]
        < failed[0].bucket + (FIVE if grain == HOUSEHOLD_5M else HOUR)
    )
    # The failure shows the tampered sum's difference, and only that one.
    energy_added = added if column == "energy_wh_sum" else 0.0
    samples_added = added if column == "sample_count" else 0
    assert close(failed[0].minute_energy_wh, failed[0].energy_wh + energy_added)
    assert failed[0].minute_samples == failed[0].samples + samples_added


def test_replace_rejects_windows_off_the_grain(conn):
    hour = closed_hour()
    with pytest.raises(ValueError):
        replace_household_5m(conn, hour + MINUTE, hour + FIVE, datetime.now(UTC))
    with pytest.raises(ValueError):
        replace_device_1h(conn, hour, hour + FIVE, datetime.now(UTC))


# --- planner (no servers) ----------------------------------------------------------------------

T0 = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
LATE = timedelta(hours=2)
SETTINGS = WindowPlanSettings(lateness=LATE, max_windows_per_run=3, max_runs_in_flight=4)


def pw(offset_windows: int, covered: int = 5, stamp_s: int = 0) -> PendingWindow:
    bucket = T0 + offset_windows * FIVE
    return PendingWindow(bucket, covered, bucket + FIVE + timedelta(seconds=stamp_s), False, None)


@pytest.mark.parametrize(
    ("pending", "now", "expected"),
    [
        # complete window: due at once
        ([pw(0)], T0 + FIVE + timedelta(seconds=3), [(0, 0)]),
        # incomplete window: waits for the lateness window, then goes with what exists
        ([pw(0, covered=4)], T0 + FIVE + timedelta(minutes=30), []),
        ([pw(0, covered=4)], T0 + FIVE + LATE, [(0, 0)]),
        # contiguous windows share a run, at most 3 per run, newest first
        ([pw(i) for i in range(5)], T0 + HOUR, [(2, 4), (0, 1)]),
        # a gap splits runs
        ([pw(0), pw(2)], T0 + HOUR, [(2, 2), (0, 0)]),
    ],
)
def test_plan_due_windows(pending, now, expected):
    plan = plan_windows(HOUSEHOLD_5M, pending, [], [], now, SETTINGS)
    assert [((r.first - T0) // FIVE, (r.last - T0) // FIVE) for r in plan] == expected


@pytest.mark.parametrize(
    ("run_created_s", "expect_request"),
    [
        (60, False),  # a run created after the newest minute reads it: wait for it
        (-60, True),  # the run started before the minute was recomputed: request again
    ],
)
def test_plan_in_flight_runs(run_created_s, expect_request):
    window = pw(0)
    stamp = window.newest_minute_computed_at
    run = WindowRun(T0, T0, stamp + timedelta(seconds=run_created_s))
    plan = plan_windows(HOUSEHOLD_5M, [window], [run], [], stamp + HOUR, SETTINGS)
    assert bool(plan) is expect_request


def test_plan_run_keys_change_exactly_when_inputs_change():
    now = T0 + HOUR
    a = plan_windows(HOUSEHOLD_5M, [pw(0)], [], [], now, SETTINGS)
    b = plan_windows(HOUSEHOLD_5M, [pw(0)], [], [], now + timedelta(seconds=2), SETTINGS)
    c = plan_windows(HOUSEHOLD_5M, [pw(0, stamp_s=1)], [], [], now, SETTINGS)
    assert a[0].run_key == b[0].run_key  # same inputs, same key: Dagster skips the duplicate
    assert a[0].run_key != c[0].run_key  # a recomputed minute: a new key, a new run
    ranged = plan_windows(HOUSEHOLD_5M, [pw(0), pw(1)], [], [], now, SETTINGS)
    changed = plan_windows(HOUSEHOLD_5M, [pw(0), pw(1, stamp_s=5)], [], [], now, SETTINGS)
    assert ranged[0].run_key != changed[0].run_key


@pytest.mark.parametrize(
    ("since_failure", "expect_request"),
    [(timedelta(seconds=10), False), (timedelta(seconds=61), True)],
)
def test_plan_retries_a_failed_window_after_the_backoff_under_a_new_key(
    since_failure, expect_request
):
    window = pw(0)
    stamp = window.newest_minute_computed_at
    ended = stamp + timedelta(seconds=30)
    failed = WindowRun(T0, T0, stamp + timedelta(seconds=1), ended)
    plan = plan_windows(HOUSEHOLD_5M, [window], [], [failed], ended + since_failure, SETTINGS)
    assert bool(plan) is expect_request
    if plan:
        first_key = plan_windows(HOUSEHOLD_5M, [window], [], [], ended, SETTINGS)[0].run_key
        assert plan[0].run_key != first_key and "retry" in plan[0].run_key


def test_plan_limits_runs_in_flight():
    busy = [WindowRun(T0 - HOUR, T0 - HOUR, T0 + 2 * HOUR) for _ in range(3)]
    pending = [pw(i) for i in range(0, 12, 2)]  # six separate windows
    plan = plan_windows(HOUSEHOLD_5M, pending, busy, [], T0 + 2 * HOUR, SETTINGS)
    assert [(r.first - T0) // FIVE for r in plan] == [10]  # one slot left: the newest


def test_plan_hour_needs_sixty_minutes():
    pending = [PendingWindow(T0, 59, T0 + HOUR, True, T0)]
    settings = WindowPlanSettings(lateness=LATE, max_windows_per_run=24)
    assert (
        plan_windows(DEVICE_1H, pending, [], [], T0 + HOUR + timedelta(minutes=5), settings) == []
    )
    assert plan_windows(DEVICE_1H, pending, [], [], T0 + HOUR + LATE, settings)
