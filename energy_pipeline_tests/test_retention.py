"""Retention of the `energy` schema: horizons, dropping day partitions, dry runs, locks, and the
vacuum of the rollup tables' finished days."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import psycopg
import pytest
from psycopg import sql

from energy_pipeline import cli, retention, retention_cli
from energy_pipeline.config import ConfigError, Settings, dagster_storage_url
from energy_pipeline.devtools.bench.reads import explain_device_day
from energy_pipeline.retention import (
    Horizon,
    PartitionVacuum,
    RetentionError,
    cutoff,
    expired_days,
    format_report,
    run_retention,
    vacuum_days,
    validate_horizons,
)
from energy_pipeline.storage import connect, create_partitions
from energy_pipeline_tests.helpers import as_user, member_of

# Today, 12:30 UTC: the migrated template holds day partitions up to the real today + 7, the
# same days retention creates ahead of `now`.
NOW = datetime.now(UTC).replace(hour=12, minute=30, second=0, microsecond=0)
LATENESS = timedelta(hours=2)
DAYS = [NOW.date() - timedelta(days=n) for n in range(6, -1, -1)]  # 6 days ago .. today
SHORT = (
    Horizon("device_rollup_1m", 3, "X"),
    Horizon("household_rollup_5m", 4, "X"),
    Horizon("device_rollup_1h", 0, "X"),
    Horizon("quarantine", 2, "X"),
    Horizon("household_daily_report", 0, "X"),
    Horizon("alerts", 5, "X"),
)


# --- Planning ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("days", "lateness", "expected"),
    [
        (0, LATENESS, None),
        (3, LATENESS, NOW - timedelta(days=3)),
        # The lateness window wins over a shorter horizon: nothing inside it is ever removed.
        (1, timedelta(days=2), NOW - timedelta(days=2)),
    ],
)
def test_cutoff(days, lateness, expected):
    assert cutoff(NOW, days, lateness) == expected


def test_expired_days_are_whole_days_before_the_cutoff():
    cut = datetime(2026, 11, 25, 12, 30, tzinfo=UTC)
    days = [date(2026, 11, d) for d in (22, 23, 24, 25, 26)]
    # The 24th ends at the 25th 00:00 <= cut; the 25th still holds data newer than the cutoff.
    assert expired_days(days, cut) == [date(2026, 11, 22), date(2026, 11, 23), date(2026, 11, 24)]
    assert expired_days(days, None) == []
    assert expired_days(days, datetime(2026, 11, 23, tzinfo=UTC)) == [date(2026, 11, 22)]


def test_default_horizons_are_valid():
    s = Settings.from_env({})
    assert (s.retention_device_rollup_1m_days, s.retention_household_rollup_5m_days) == (35, 400)
    assert (s.retention_device_rollup_1h_days, s.retention_daily_report_days) == (0, 0)
    assert (s.retention_quarantine_days, s.retention_alerts_days) == (30, 400)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ENERGY_RETENTION_DEVICE_ROLLUP_1M_DAYS": "20"}, "minute partition window (31 days"),
        ({"ENERGY_RETENTION_HOUSEHOLD_ROLLUP_5M_DAYS": "30"}, "minute partition window"),
        (
            {"ENERGY_RETENTION_QUARANTINE_DAYS": "1", "ENERGY_LATENESS_SECONDS": "86400"},
            "ENERGY_RETENTION_QUARANTINE_DAYS (1 days) must be longer than the lateness window",
        ),
        (
            {"ENERGY_RAW_RETENTION_DAYS": "2", "ENERGY_LATENESS_SECONDS": "172800"},
            "ENERGY_RAW_RETENTION_DAYS (2) must be longer than the lateness window",
        ),
        ({"ENERGY_RETENTION_ALERTS_DAYS": "-1"}, "must be >= 0"),
    ],
)
def test_horizons_inside_the_lateness_or_minute_window_are_refused(env, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings.from_env(env)


def test_zero_keeps_forever_and_short_raw_retention_moves_the_bound():
    s = Settings.from_env(
        {"ENERGY_RETENTION_DEVICE_ROLLUP_1M_DAYS": "0", "ENERGY_RETENTION_QUARANTINE_DAYS": "0"}
    )
    assert s.retention_device_rollup_1m_days == 0
    validate_horizons(replace(s, raw_retention_days=3, retention_device_rollup_1m_days=4))
    with pytest.raises(ConfigError):
        validate_horizons(replace(s, raw_retention_days=3, retention_device_rollup_1m_days=3))


MIDDAY = datetime(2026, 11, 28, 12, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("now", "lateness", "expected"),
    [
        # 10:30 is past the 27th's end: the 27th and the two days before it, never the 28th.
        (MIDDAY, LATENESS, [date(2026, 11, 25), date(2026, 11, 26), date(2026, 11, 27)]),
        # 22:30 on the 27th: the 27th is still inside the lateness window.
        (
            MIDDAY,
            timedelta(hours=14),
            [date(2026, 11, 24), date(2026, 11, 25), date(2026, 11, 26)],
        ),
        # The run just after midnight with no lateness: yesterday is finished.
        (
            datetime(2026, 11, 28, 0, 0, tzinfo=UTC),
            timedelta(0),
            [date(2026, 11, 25), date(2026, 11, 26), date(2026, 11, 27)],
        ),
    ],
)
def test_vacuum_days_are_the_last_finished_days(now, lateness, expected):
    assert vacuum_days(now, lateness) == expected
    assert vacuum_days(now, lateness, days=1) == expected[-1:]


@pytest.mark.parametrize(
    ("inserted", "modified", "pages", "visible", "needed"),
    [
        (0, 0, 5, 5, False),  # vacuumed and analyzed since its last write
        (0, 0, 0, 0, False),  # empty
        (12, 0, 5, 5, True),  # a tail of rows never vacuumed (analyzed since, even)
        (0, 3, 5, 5, True),  # rows updated or deleted since the last analyze
        (0, 0, 5, 4, True),  # a vacuum ran while some rows were not yet visible to all
    ],
)
def test_a_partition_needs_a_vacuum_until_it_is_all_visible_and_analyzed(
    inserted, modified, pages, visible, needed
):
    v = PartitionVacuum("device_rollup_1m", DAYS[0], inserted, modified, pages, visible)
    assert v.needed is needed


# --- Against PostgreSQL -------------------------------------------------------------------------


def _fill(conn: psycopg.Connection) -> None:
    """Partitions for DAYS in every day-partitioned table, a few rows per day, ledger rows per
    minute and window, and quarantine rows."""
    for table in retention.PARTITIONED_TABLES:
        create_partitions(conn, table, DAYS[0], DAYS[-1])
    with conn.transaction():
        for day in DAYS:
            start = retention.day_start(day)
            for m in range(0, 12 * 60, 60):  # one minute an hour, 12 hours of the day
                bucket = start + timedelta(minutes=m)
                for dev in ("d1", "d2"):
                    conn.execute(
                        "INSERT INTO energy.device_rollup_1m (device_id, bucket, household_id, "
                        "sample_count, energy_wh_sum, computed_at) "
                        "VALUES (%s, %s, 'h1', 60, 1, %s)",
                        (dev, bucket, NOW),
                    )
                    conn.execute(
                        "INSERT INTO energy.device_rollup_1h (device_id, bucket, household_id, "
                        "sample_count, energy_wh_sum, computed_at) "
                        "VALUES (%s, %s, 'h1', 60, 1, %s)",
                        (dev, bucket, NOW),
                    )
                conn.execute(
                    "INSERT INTO energy.household_rollup_5m (household_id, bucket, device_count, "
                    "sample_count, energy_wh_sum, computed_at) VALUES ('h1', %s, 2, 120, 2, %s)",
                    (bucket, NOW),
                )
                conn.execute(
                    "INSERT INTO energy.rollup_minutes (bucket, points_read, power_w_points, "
                    "energy_wh_points, duplicates_dropped, rejected, devices, computed_at) "
                    "VALUES (%s, 120, 120, 120, 0, 0, 2, %s)",
                    (bucket, NOW),
                )
                for grain, expected in (("household_rollup_5m", 5), ("device_rollup_1h", 60)):
                    conn.execute(
                        "INSERT INTO energy.rollup_windows (grain, bucket, minutes_covered, "
                        "minutes_expected, computed_at) VALUES (%s, %s, 1, %s, %s)",
                        (grain, bucket, expected, NOW),
                    )
                conn.execute(
                    "INSERT INTO energy.quarantine (source, bucket, device_id, reason) "
                    "VALUES ('device_rollup_1m', %s, 'd1', 'negative')",
                    (bucket,),
                )


def _days(conn: psycopg.Connection, table: str, column: str = "bucket") -> dict[date, int]:
    rows = conn.execute(
        f"SELECT ({column} AT TIME ZONE 'UTC')::date, count(*) FROM energy.{table} GROUP BY 1"
    ).fetchall()
    return dict(rows)


def _window_days(conn: psycopg.Connection, grain: str) -> dict[date, int]:
    rows = conn.execute(
        "SELECT (bucket AT TIME ZONE 'UTC')::date, count(*) FROM energy.rollup_windows "
        "WHERE grain = %s GROUP BY 1",
        (grain,),
    ).fetchall()
    return dict(rows)


def _partition_days(conn: psycopg.Connection, table: str) -> list[date]:
    return [p.day for p in retention.day_partitions(conn, table)]


def _state(conn: psycopg.Connection) -> dict:
    """Everything retention could change: rows per day and table, partitions, ledgers."""
    tables = (*retention.PARTITIONED_TABLES, "rollup_minutes", "quarantine")
    return {
        "rows": {t: _days(conn, t) for t in tables},
        "windows": {g: _window_days(conn, g) for g in ("household_rollup_5m", "device_rollup_1h")},
        "partitions": {t: _partition_days(conn, t) for t in retention.PARTITIONED_TABLES},
    }


@pytest.fixture
def filled(pg_dsn):
    with connect(pg_dsn) as conn:
        _fill(conn)
        yield conn


def test_drops_exactly_the_days_past_each_horizon_and_their_ledger_rows(filled):
    conn = filled
    before = _state(conn)
    report = run_retention(conn, SHORT, LATENESS, NOW)
    after = _state(conn)

    # device_rollup_1m: cutoff 3 days back (25th 12:30): the 22nd..24th go, the 25th stays.
    gone_1m = [d for d in DAYS if d <= NOW.date() - timedelta(days=4)]
    assert report.tables["device_rollup_1m"].partitions_dropped == gone_1m
    assert len(gone_1m) == 3
    kept = [d for d in DAYS if d not in gone_1m]
    assert sorted(after["rows"]["device_rollup_1m"]) == kept
    assert all(
        after["rows"]["device_rollup_1m"][d] == before["rows"]["device_rollup_1m"][d] for d in kept
    )
    assert sorted(after["rows"]["rollup_minutes"]) == kept
    assert after["partitions"]["device_rollup_1m"][: len(kept)] == kept
    assert report.tables["device_rollup_1m"].rows_removed == 3 * 24
    assert report.tables["rollup_minutes"].rows_removed == 3 * 12

    # household_rollup_5m: 4 days; its windows go with it, the hourly ones stay (kept forever).
    gone_5m = [d for d in DAYS if d <= NOW.date() - timedelta(days=5)]
    assert report.tables["household_rollup_5m"].partitions_dropped == gone_5m
    assert sorted(after["windows"]["household_rollup_5m"]) == [d for d in DAYS if d not in gone_5m]
    assert after["windows"]["device_rollup_1h"] == before["windows"]["device_rollup_1h"]
    assert after["rows"]["device_rollup_1h"] == before["rows"]["device_rollup_1h"]
    assert report.tables["device_rollup_1h"].partitions_dropped == []

    # quarantine: rows, not partitions, older than 2 days (26th 12:30): 4 whole days and the
    # 26th's twelve rows (00:00..11:00).
    assert report.tables["quarantine"].rows_removed == 5 * 12
    q_cut = NOW - timedelta(days=2)
    left = conn.execute("SELECT min(bucket) FROM energy.quarantine").fetchone()
    assert left is not None and left[0] >= q_cut
    assert report.tables["device_rollup_1m"].bytes_freed > 0
    # Partitions stay created ahead.
    assert _partition_days(conn, "device_rollup_1m")[-1] == NOW.date() + timedelta(days=7)
    assert "device_rollup_1m" in format_report(report)


def test_dry_run_changes_nothing_and_plans_what_the_real_run_does(filled):
    conn = filled
    before = _state(conn)
    dry = run_retention(conn, SHORT, LATENESS, NOW, dry_run=True)
    assert _state(conn) == before
    assert dry.dry_run and "dry run: nothing changed" in format_report(dry)
    assert dry.partitions_dropped == 5 and dry.rows_removed > 0

    real = run_retention(conn, SHORT, LATENESS, NOW)
    for name, planned in dry.tables.items():
        done = real.tables[name]
        assert (planned.partitions_dropped, planned.rows_removed) == (
            done.partitions_dropped,
            done.rows_removed,
        ), name
    # The plan's size estimate for dropped partitions is what dropping them freed.
    assert dry.tables["device_rollup_1m"].bytes_freed == real.tables["device_rollup_1m"].bytes_freed


def test_second_run_removes_nothing(filled):
    conn = filled
    first = run_retention(conn, SHORT, LATENESS, NOW)
    state = _state(conn)
    second = run_retention(conn, SHORT, LATENESS, NOW)
    assert first.rows_removed > 0
    assert (second.partitions_dropped, second.rows_removed, second.partitions_created) == (0, 0, 0)
    assert _state(conn) == state


def test_an_interrupted_detach_is_finished_by_the_next_run(filled):
    conn = filled
    # A run that died between DETACH and DROP leaves a standalone table with the partition's name.
    day = DAYS[0]
    conn.execute(
        "ALTER TABLE energy.device_rollup_1m DETACH PARTITION "
        f"energy.device_rollup_1m_p{day:%Y%m%d}"
    )
    report = run_retention(conn, SHORT, LATENESS, NOW)
    assert day in report.tables["device_rollup_1m"].partitions_dropped
    assert day not in _partition_days(conn, "device_rollup_1m")
    assert day not in _days(conn, "rollup_minutes")


def test_a_reader_holding_an_old_partition_makes_retention_fail_clearly_not_hang(filled, pg_dsn):
    conn = filled
    holding, release = threading.Event(), threading.Event()

    def reader() -> None:
        with psycopg.connect(pg_dsn) as r, r.transaction():
            r.execute(
                "SELECT count(*) FROM energy.device_rollup_1m WHERE bucket < %s",
                (retention.day_start(DAYS[1]),),
            )
            holding.set()
            release.wait(30)

    t = threading.Thread(target=reader)
    t.start()
    try:
        assert holding.wait(10)
        started = time.monotonic()
        with pytest.raises(RetentionError, match="lock was not granted within 300 ms"):
            run_retention(conn, SHORT, LATENESS, NOW, lock_timeout_ms=300)
        assert time.monotonic() - started < 10
        # Whatever was done is consistent: a dropped day has no ledger rows, a kept one all.
        partitions, ledger = (
            _partition_days(conn, "device_rollup_1m"),
            _days(conn, "rollup_minutes"),
        )
        for day in DAYS:
            assert (day in ledger) == (day in partitions), day
    finally:
        release.set()
        t.join()
    report = run_retention(conn, SHORT, LATENESS, NOW, lock_timeout_ms=300)
    assert _partition_days(conn, "device_rollup_1m")[0] == DAYS[3]
    assert sorted(_days(conn, "rollup_minutes")) == DAYS[3:]
    assert report.tables["device_rollup_1m"].partitions_dropped


def test_alert_history_loses_old_resolved_episodes_outbox_rows_and_silences(pg_dsn):
    with connect(pg_dsn) as conn:
        conn.execute(
            "INSERT INTO energy.alert_rules (rule_id, name, kind, scope, metric, window_size, "
            "operator, threshold, severity, channels, spec) VALUES ('r1', 'r1', 'threshold', "
            "'device', 'power_w_avg', '1m', '>', 1, 'info', '{log}', '{}')"
        )
        episodes = [
            ("old", "resolved", NOW - timedelta(days=9), NOW - timedelta(days=8)),
            ("recent", "resolved", NOW - timedelta(days=3), NOW - timedelta(days=2)),
            ("open", "firing", NOW - timedelta(days=20), None),
        ]
        for entity, state, started, resolved in episodes:
            row = conn.execute(
                "INSERT INTO energy.alerts (rule_id, entity_type, entity, grain, state, "
                "started_at, last_bucket, resolved_at, last_notified_at) VALUES "
                "('r1', 'device', %s, '1m', %s, %s, %s, %s, %s) RETURNING alert_id",
                (entity, state, started, started, resolved, started),
            ).fetchone()
            assert row is not None
            for kind in ("firing", "resolved") if resolved else ("firing",):
                conn.execute(
                    "INSERT INTO energy.alert_outbox (idempotency_key, alert_id, rule_id, entity, "
                    "channel, kind, payload) VALUES (%s, %s, 'r1', %s, 'log', %s, '{}')",
                    (f"{entity}:{kind}", row[0], entity, kind),
                )
        # Silences: ended before the 5-day cutoff, ended since, still running.
        for reason, until in (("old", -9), ("recent", -1), ("running", 1)):
            conn.execute(
                "INSERT INTO energy.alert_silences (rule_id, until, reason) VALUES ('r1', %s, %s)",
                (NOW + timedelta(days=until), reason),
            )
        dry = run_retention(conn, SHORT, LATENESS, NOW, dry_run=True)
        report = run_retention(conn, SHORT, LATENESS, NOW)  # alerts: 5 days
        again = run_retention(conn, SHORT, LATENESS, NOW)
        for table, removed in (("alerts", 1), ("alert_outbox", 2), ("alert_silences", 1)):
            assert dry.tables[table].rows_removed == report.tables[table].rows_removed == removed
            assert again.tables[table].rows_removed == 0
        left = conn.execute("SELECT entity FROM energy.alerts ORDER BY entity").fetchall()
        assert left == [("open",), ("recent",)]
        outbox = conn.execute("SELECT count(*) FROM energy.alert_outbox").fetchone()
        assert outbox == (3,)
        silences = conn.execute("SELECT reason FROM energy.alert_silences ORDER BY reason")
        assert silences.fetchall() == [("recent",), ("running",)]


def test_daily_reports_older_than_their_horizon_go_and_zero_keeps_them(pg_dsn):
    with connect(pg_dsn) as conn:
        for age in (9, 4, 2, 0):
            day = NOW.date() - timedelta(days=age)
            conn.execute(
                "INSERT INTO energy.household_daily_report (household_id, day, timezone, "
                "day_start, day_end, energy_kwh, minutes_covered, minutes_expected, "
                "generated_at) VALUES ('h1', %s, 'UTC', %s, %s, 1, 1440, 1440, %s)",
                (day, retention.day_start(day), retention.day_start(day) + retention.DAY, NOW),
            )
        kept = run_retention(conn, SHORT, LATENESS, NOW)  # reports: 0, kept forever
        assert kept.tables["household_daily_report"].rows_removed == 0
        horizons = (*SHORT[:4], Horizon("household_daily_report", 3, "X"), SHORT[5])
        report = run_retention(conn, horizons, LATENESS, NOW)
        assert report.tables["household_daily_report"].rows_removed == 2
        days = conn.execute("SELECT day FROM energy.household_daily_report ORDER BY day")
        assert [d for (d,) in days] == [NOW.date() - timedelta(days=a) for a in (2, 0)]


def test_quarantine_is_removed_in_batches(filled, pg_dsn):
    conn = filled
    cut = NOW - timedelta(days=2)
    expected = conn.execute(
        "SELECT count(*) FROM energy.quarantine WHERE bucket < %s", (cut,)
    ).fetchone()
    removed = retention.delete_in_batches(
        conn, "quarantine", sql.SQL("bucket < %s"), (cut,), dry_run=False, batch_rows=7
    )
    assert expected is not None and removed == expected[0] > 7
    left = conn.execute("SELECT count(*) FROM energy.quarantine WHERE bucket < %s", (cut,))
    assert left.fetchone() == (0,)


# --- Vacuum of finished days ----------------------------------------------------------------------

FINISHED, TODAY = NOW.date() - timedelta(days=1), NOW.date()
DEVICES = 20
# Minutes of each day written before autovacuum's last run, and after it: 20 devices x 40
# minutes = 800 rows, below the 1,000 rows that would make autovacuum run again.
VACUUMED_MINUTES, TAIL_MINUTES = 60, 40
MINUTES = VACUUMED_MINUTES + TAIL_MINUTES


def _insert_minutes(conn: psycopg.Connection, day: date, first: int, count: int) -> None:
    """DEVICES devices' minutes `first` .. `first + count - 1` of `day`, a minute at a time as the
    pipeline writes them; the counts reach pg_stat_user_tables as this backend goes idle."""
    start = retention.day_start(day) + timedelta(minutes=first)
    conn.execute(
        "INSERT INTO energy.device_rollup_1m (device_id, bucket, household_id, sample_count, "
        "power_w_avg, energy_wh_sum, computed_at) "
        "SELECT 'd' || d, b, 'h1', 60, 100, 1.5, now() "
        "FROM generate_series(%s::timestamptz, %s::timestamptz, interval '1 minute') b "
        "CROSS JOIN generate_series(1, %s) d ORDER BY b, d",
        (start, start + timedelta(minutes=count - 1), DEVICES),
    )
    conn.execute("SELECT pg_stat_force_next_flush()")


def _write_days(conn: psycopg.Connection, days: list[date]) -> None:
    """Each of `days` as a small fleet leaves it: rows that a vacuum saw, then a tail of fewer
    rows than autovacuum waits for."""
    for table in retention.PARTITIONED_TABLES:
        create_partitions(conn, table, DAYS[0], DAYS[-1])
    # The test cluster commits asynchronously; VACUUM marks a page all-visible only once its rows'
    # commit is flushed, which a synchronous commit makes sure of.
    conn.execute("SET synchronous_commit = on")
    for day in days:
        _insert_minutes(conn, day, 0, VACUUMED_MINUTES)
    conn.execute("VACUUM (ANALYZE) energy.device_rollup_1m")  # autovacuum's last run of the day
    for day in days:
        _insert_minutes(conn, day, VACUUMED_MINUTES, TAIL_MINUTES)


def _heap_fetches(conn: psycopg.Connection, day: date) -> int:
    """Heap tuples the index-only read of one device's minutes of `day` had to visit."""
    start = retention.day_start(day)
    plan = explain_device_day(conn, "d7", (start, start + timedelta(minutes=MINUTES)))
    assert plan["rows"] == MINUTES and plan["scan_types"] == ["Index Only Scan"]
    return int(plan["heap_fetches"])


def test_finished_days_are_vacuumed_once_and_today_is_left_to_autovacuum(pg_dsn):
    with connect(pg_dsn) as conn:
        _write_days(conn, [FINISHED, TODAY])
        # Tables this small would be read from the heap; the index-only path is what is examined.
        conn.execute("SET enable_seqscan = off")
        conn.execute("SET enable_bitmapscan = off")
        before = {day: _heap_fetches(conn, day) for day in (FINISHED, TODAY)}

        dry = run_retention(conn, SHORT, LATENESS, NOW, dry_run=True)
        assert [v.name for v in dry.vacuums] == [f"device_rollup_1m_p{FINISHED:%Y%m%d}"]
        assert dry.partitions_vacuumed == 0 and "would vacuum (ANALYZE): 1" in format_report(dry)
        assert _heap_fetches(conn, FINISHED) == before[FINISHED]

        first = run_retention(conn, SHORT, LATENESS, NOW)
        after = {day: _heap_fetches(conn, day) for day in (FINISHED, TODAY)}
        again = run_retention(conn, SHORT, LATENESS, NOW)

    # The tail's rows (at least) are outside the visibility map: each costs a heap visit.
    assert before[FINISHED] >= TAIL_MINUTES and before[TODAY] >= TAIL_MINUTES
    [v] = first.vacuums
    assert (v.table, v.day, v.vacuumed, v.error) == ("device_rollup_1m", FINISHED, True, "")
    assert v.rows_since_vacuum == v.rows_since_analyze == DEVICES * TAIL_MINUTES
    # pg_class still held the last vacuum's figures; this one counted the tail's pages too.
    assert v.visible_pages == v.pages < v.visible_pages_after == v.pages_after
    assert first.partitions_vacuumed == 1
    assert "vacuumed (ANALYZE): 1 finished day partitions" in format_report(first)
    # Index-only reads of the finished day no longer visit the heap; today's still do.
    assert after == {FINISHED: 0, TODAY: before[TODAY]}
    # Nothing was written since: the second run finds nothing to vacuum.
    assert again.vacuums == [] and again.partitions_vacuumed == 0


def test_only_the_last_finished_days_are_vacuumed(pg_dsn):
    with connect(pg_dsn) as conn:
        _write_days(conn, DAYS)
        report = run_retention(conn, SHORT, LATENESS, NOW)
    vacuumed = {(v.table, v.day) for v in report.vacuums if v.vacuumed}
    assert vacuumed == {("device_rollup_1m", d) for d in vacuum_days(NOW, LATENESS)}
    assert not report.vacuum_warnings


def test_a_finished_day_held_by_a_lock_is_a_warning_and_retention_finishes(pg_dsn):
    with connect(pg_dsn) as conn:
        _write_days(conn, [FINISHED, FINISHED - timedelta(days=1)])
        part = f"energy.device_rollup_1m_p{FINISHED:%Y%m%d}"
        with psycopg.connect(pg_dsn) as other, other.transaction():
            # The lock a running vacuum or analyze holds on it.
            other.execute(f"LOCK TABLE {part} IN SHARE UPDATE EXCLUSIVE MODE")
            report = run_retention(conn, SHORT, LATENESS, NOW, lock_timeout_ms=300)
        ahead = _partition_days(conn, "device_rollup_1h")[-1]
        again = run_retention(conn, SHORT, LATENESS, NOW, lock_timeout_ms=300)

    held = {v.day: v for v in report.vacuums}
    assert held[FINISHED].error.startswith("not vacuumed: a lock was not granted within 300 ms")
    assert not held[FINISHED].vacuumed
    assert held[FINISHED - timedelta(days=1)].vacuumed
    assert report.vacuum_warnings == [f"{part} {held[FINISHED].error}"]
    assert f"warning: {part} not vacuumed" in format_report(report)
    # The rest of the run went through: old partitions dropped, partitions created ahead.
    assert report.partitions_dropped == 5 and ahead == NOW.date() + timedelta(days=7)
    # The next run vacuums the day it could not.
    assert [(v.day, v.vacuumed) for v in again.vacuums] == [(FINISHED, True)]


KEEP_ALL = tuple(replace(h, days=0) for h in SHORT)  # nothing expires: only the vacuum acts


def test_a_finished_day_vacuums_only_as_its_owner_and_otherwise_warns(pg_dsn, logins):
    with connect(pg_dsn) as conn:
        _write_days(conn, [FINISHED])
    part = f"energy.device_rollup_1m_p{FINISHED:%Y%m%d}"
    # The pipeline's own login can run retention when nothing expires, but the partitions
    # belong to energy_owner (ensure_day_partitions creates them as it).
    with connect(as_user(pg_dsn, logins("writer", member_of("energy_writer")))) as conn:
        writer = run_retention(conn, KEEP_ALL, LATENESS, NOW)
    with connect(as_user(pg_dsn, logins("owner", member_of("energy_owner")))) as conn:
        owner = run_retention(conn, KEEP_ALL, LATENESS, NOW)

    [w] = writer.vacuums
    assert (w.day, w.owned, w.vacuumed) == (FINISHED, False, False)
    assert w.error == (
        "not vacuumed: only its owner can vacuum it (connect as a member of energy_owner)"
    )
    assert writer.partitions_vacuumed == 0
    assert writer.vacuum_warnings == [f"{part} {w.error}"]
    assert f"warning: {part} not vacuumed: only its owner" in format_report(writer)
    # The day still needed it; its owner's run vacuums it.
    [o] = owner.vacuums
    assert (o.day, o.owned, o.vacuumed, o.error) == (FINISHED, True, True, "")
    assert owner.partitions_vacuumed == 1 and not owner.vacuum_warnings


# --- Command line ---------------------------------------------------------------------------


def _cli_env(monkeypatch, settings, dagster_home=None) -> None:
    monkeypatch.setenv("ENERGY_PG_DSN", settings.pg_dsn)
    monkeypatch.setenv("INFLUXDB_URL", settings.influx_url)
    monkeypatch.setenv("INFLUXDB_DATABASE", settings.influx_database)
    monkeypatch.setenv("DAGSTER_PG_URL", dagster_storage_url(settings.dagster_pg_url))
    if dagster_home:
        monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    else:
        monkeypatch.delenv("DAGSTER_HOME", raising=False)


def test_cli_dry_run_prints_the_plan_and_changes_nothing(settings, monkeypatch, capsys):
    old_day = datetime.now(UTC).date() - timedelta(days=40)
    with connect(settings.pg_dsn) as conn:
        create_partitions(conn, "device_rollup_1m", old_day, old_day)
        before = _partition_days(conn, "device_rollup_1m")
    _cli_env(monkeypatch, settings)

    assert cli.main(["retention", "--dry-run", "--apply-influx-policy"]) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing changed" in out
    assert "would remove: 1 partitions" in out
    assert "Dagster runs: skipped (DAGSTER_HOME is not set)" in out
    assert 'would run: ALTER RETENTION POLICY "autogen"' in out
    with connect(settings.pg_dsn) as conn:
        assert _partition_days(conn, "device_rollup_1m") == before

    assert cli.main(["retention"]) == 0
    out = capsys.readouterr().out
    assert "applied" in out and "removed: 1 partitions" in out
    with connect(settings.pg_dsn) as conn:
        assert old_day not in _partition_days(conn, "device_rollup_1m")


def test_cli_applies_the_raw_retention_policy_on_any_influxdb(
    settings, influx_db, monkeypatch, capsys
):
    _cli_env(monkeypatch, settings)
    monkeypatch.setenv("ENERGY_RAW_RETENTION_DAYS", "12")
    monkeypatch.setenv("ENERGY_RETENTION_DEVICE_ROLLUP_1M_DAYS", "13")
    assert cli.main(["retention", "--apply-influx-policy", "--no-dagster"]) == 0
    assert "DURATION 12d SHARD DURATION 1d" in capsys.readouterr().out
    [result] = influx_db.query_json(f'SHOW RETENTION POLICIES ON "{influx_db.database}"')
    series = result["series"][0]
    rows = [dict(zip(series["columns"], v, strict=True)) for v in series["values"]]
    assert [(r["name"], r["duration"]) for r in rows if r["default"]] == [("autogen", "288h0m0s")]


def test_cli_purges_dagster_runs_through_dagster_home(
    settings, dagster_db, tmp_path, monkeypatch, capsys
):
    (tmp_path / "dagster.yaml").write_text(
        "storage:\n  postgres:\n    postgres_url:\n      env: DAGSTER_PG_URL\n"
    )
    _cli_env(monkeypatch, replace(settings, dagster_pg_url=dagster_db), tmp_path)
    assert cli.main(["retention", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Dagster runs created before" in out and "would delete 0" in out
    assert "database size (dagster)" in out


def test_cli_reads_dagsters_url_only_for_dagster_and_checks_it_first(
    settings, tmp_path, monkeypatch, capsys
):
    old_day = datetime.now(UTC).date() - timedelta(days=40)
    with connect(settings.pg_dsn) as conn:
        create_partitions(conn, "device_rollup_1m", old_day, old_day)
    _cli_env(monkeypatch, settings, tmp_path)
    odd = replace(settings, dagster_pg_url="dagster-db")  # no scheme at all
    parser = cli.build_parser()

    # Dagster on: the URL is refused by name before anything is removed.
    with pytest.raises(ConfigError, match="DAGSTER_PG_URL must start with postgresql"):
        retention_cli.cmd_retention(parser.parse_args(["retention"]), odd)
    with connect(settings.pg_dsn) as conn:
        assert old_day in _partition_days(conn, "device_rollup_1m")

    # --no-dagster never reads it.
    args = parser.parse_args(["retention", "--no-dagster"])
    assert retention_cli.cmd_retention(args, odd) == 0
    out = capsys.readouterr().out
    assert "removed: 1 partitions" in out and "Dagster" not in out
    with connect(settings.pg_dsn) as conn:
        assert old_day not in _partition_days(conn, "device_rollup_1m")


def test_cli_reports_a_refused_horizon_clearly(settings, monkeypatch, capsys):
    _cli_env(monkeypatch, settings)
    monkeypatch.setenv("ENERGY_RETENTION_DEVICE_ROLLUP_1M_DAYS", "7")
    assert cli.main(["retention", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "ENERGY_RETENTION_DEVICE_ROLLUP_1M_DAYS (7 days) must be at least" in err


@pytest.mark.parametrize(("group", "drops"), [("energy_writer", False), ("energy_owner", True)])
def test_dropping_partitions_needs_the_owner_role(filled, pg_dsn, group, drops):
    user = f"u_ret_{uuid.uuid4().hex[:8]}"
    with connect(pg_dsn) as admin:
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
                sql.Identifier(user), sql.Identifier(group)
            )
        )
    try:
        as_user = psycopg.conninfo.make_conninfo(pg_dsn, user=user)
        with connect(as_user) as conn:
            if drops:
                report = run_retention(conn, SHORT, LATENESS, NOW)
                assert report.partitions_dropped == 5
            else:
                with pytest.raises(RetentionError, match="member of energy_owner"):
                    run_retention(conn, SHORT, LATENESS, NOW)
                assert _partition_days(conn, "device_rollup_1m")[0] == DAYS[0]
    finally:
        with connect(pg_dsn) as admin:
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(user)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(user)))
