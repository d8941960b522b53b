"""The BI contract: a `bi_reader` login reads every view and table meant for BI and nothing else,
the views carry the registry's metadata, and `fresh_as_of` names the newest complete bucket."""

from __future__ import annotations

import re
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal
from zoneinfo import ZoneInfo

import psycopg
import pytest
from psycopg import errors, sql

from energy_pipeline.config import PROJECT_ROOT
from energy_pipeline.devtools.services import LocalPostgres
from energy_pipeline_tests.helpers import BI_LOGIN_SQL, as_user

BI_VIEWS = {
    "bi_households",
    "bi_device_minute",
    "bi_household_5m",
    "bi_device_hour",
    "bi_household_daily",
    "fresh_as_of",
}
# Tables BI may read besides the views: the rollups, the registry, quarantined points (for
# data-quality dashboards) and the ledgers (completeness per minute and window, audit of reads).
BI_TABLES = {
    "devices",
    "device_households",
    "device_rollup_1m",
    "household_rollup_5m",
    "device_rollup_1h",
    "quarantine",
    "rollup_minutes",
    "rollup_windows",
    "raw_out_of_range",
    # Alerts: rules, episodes, notifications and silences (for alert dashboards).
    "alert_rules",
    "alerts",
    "alert_outbox",
    "alert_silences",
    # Daily reports, their ledger and the tariffs they are priced with.
    "household_daily_report",
    "report_days",
    "tariffs",
    "tariff_bands",
    "household_tariffs",
}
# The pipeline's own bookkeeping, which BI has no use for: no SELECT.
INTERNAL_TABLES = {
    "alembic_version",
    "alert_pending",
    "alert_evaluations",
    "alert_baselines",
    "alert_baseline_hours",
}
# Views BI has no use for: `fresh_as_of` reads this one with its owner's rights (migration 0013).
INTERNAL_VIEWS = {"rollup_freshness"}
INTERNAL = INTERNAL_TABLES | INTERNAL_VIEWS
WRITE_PRIVILEGES = ("INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
DAY = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)  # has partitions
T0 = DAY + timedelta(hours=10)


def seed(dsn: str) -> None:
    """Three devices in two households, one with a stale household tag, and a row per grain."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO energy.devices "
            "(device_id, household_id, name, model, location, timezone, profile) VALUES "
            "('d1', 'h1', 'Fridge', 'F-100', 'Kitchen', 'Europe/Berlin', 'fridge'),"
            "('d2', 'h1', 'Heat pump', 'HP-7', 'Cellar', 'Europe/Berlin', 'hvac'),"
            "('d3', 'h2', 'Charger', 'EV-2', 'Garage', 'America/New_York', 'ev_charger')"
        )
        conn.execute(
            "INSERT INTO energy.device_rollup_1m (device_id, bucket, household_id, sample_count, "
            "power_w_avg, power_w_min, power_w_max, energy_wh_sum, rejected_count, computed_at) "
            "VALUES ('d1', %(t)s, 'h-old', 60, 120, 100, 140, 2, 1, %(c)s),"
            "       ('d3', %(t)s, 'h2', 60, 7000, 6900, 7100, 116.7, 0, %(c)s)",
            {"t": T0, "c": T0 + timedelta(seconds=70)},
        )
        conn.execute(
            "INSERT INTO energy.household_rollup_5m (household_id, bucket, device_count, "
            "sample_count, energy_wh_sum, power_w_avg, power_w_peak, computed_at) "
            "VALUES ('h1', %(t)s, 2, 600, 40, 480, 520, %(c)s)",
            {"t": T0, "c": T0 + timedelta(minutes=5, seconds=10)},
        )
        conn.execute(
            "INSERT INTO energy.device_rollup_1h (device_id, bucket, household_id, sample_count, "
            "power_w_avg, power_w_min, power_w_max, energy_wh_sum, rejected_count, computed_at) "
            "VALUES ('d2', %(t)s, 'h1', 3600, 300, 0, 2000, 300, 0, %(c)s)",
            {"t": T0, "c": T0 + timedelta(hours=1, seconds=10)},
        )
        conn.execute(
            "INSERT INTO energy.rollup_windows (grain, bucket, minutes_covered, minutes_expected, "
            "computed_at) VALUES ('household_rollup_5m', %(t)s, 4, 5, %(c)s),"
            "                    ('device_rollup_1h', %(t)s, 60, 60, %(c)s)",
            {"t": T0, "c": T0 + timedelta(hours=1)},
        )


def bi_relations(conn: psycopg.Connection) -> dict[str, str]:
    """Every table and view of schema `energy` (partitions included) → its kind."""
    rows = conn.execute(
        "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'energy' AND c.relkind IN ('r', 'p', 'v', 'm')"
    ).fetchall()
    return dict(rows)


def test_bi_reader_reads_every_bi_view_and_table(pg_dsn, logins):
    seed(pg_dsn)
    user = logins("bi", BI_LOGIN_SQL)
    with psycopg.connect(pg_dsn) as conn:
        relations = bi_relations(conn)
    views = {name for name, kind in relations.items() if kind == "v"}
    parents = {name for name, kind in relations.items() if kind in ("r", "p")}
    parents = {name for name in parents if not name.rsplit("_p", 1)[-1].isdigit()}
    assert views == BI_VIEWS | INTERNAL_VIEWS
    assert parents == BI_TABLES | INTERNAL_TABLES

    with psycopg.connect(as_user(pg_dsn, user), autocommit=True) as conn:
        assert conn.execute("SHOW default_transaction_read_only").fetchone()[0] == "on"
        for name in sorted(relations):
            query = sql.SQL("SELECT count(*) FROM energy.{}").format(sql.Identifier(name))
            if name in INTERNAL:
                with pytest.raises(errors.InsufficientPrivilege):
                    conn.execute(query)
                continue
            assert conn.execute(query).fetchone()[0] >= 0, name
        assert conn.execute("SELECT count(*) FROM energy.bi_device_minute").fetchone()[0] == 2
        granted = conn.execute(
            "SELECT c.relname, has_table_privilege(c.oid, 'SELECT'), "
            "       has_table_privilege(c.oid, %s) "
            "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'energy' AND c.relkind IN ('r', 'p', 'v', 'm')",
            (", ".join(WRITE_PRIVILEGES),),
        ).fetchall()
    for name, may_select, may_write in granted:
        assert may_select == (name not in INTERNAL), name
        assert not may_write, name


def test_bi_reader_cannot_write_or_create_even_with_read_only_switched_off(pg_dsn, logins):
    from energy_pipeline.migrations import upgrade

    # As `migrate` leaves a database (database privileges are not copied from the template).
    upgrade(pg_dsn)
    seed(pg_dsn)
    user = logins("bi", BI_LOGIN_SQL)
    forbidden = [
        "INSERT INTO energy.devices (device_id, household_id) VALUES ('x', 'y')",
        "UPDATE energy.device_rollup_1m SET energy_wh_sum = 0",
        f"UPDATE energy.device_rollup_1m_p{DAY:%Y%m%d} SET energy_wh_sum = 0",
        "DELETE FROM energy.quarantine",
        "DELETE FROM energy.rollup_minutes",
        "TRUNCATE energy.household_rollup_5m",
        "INSERT INTO energy.rollup_windows (grain, bucket, minutes_covered, minutes_expected, "
        "computed_at) VALUES ('device_rollup_1h', now(), 1, 60, now())",
        "CREATE TABLE energy.x (a integer)",
        "CREATE VIEW energy.v AS SELECT 1 AS a",
        "CREATE TABLE public.x (a integer)",
        "CREATE SCHEMA bi_scratch",
        "CREATE TEMP TABLE scratch (a integer)",
        "ALTER VIEW energy.fresh_as_of RENAME TO f",
        "DROP VIEW energy.bi_device_minute",
        "CREATE FUNCTION energy.f() RETURNS integer LANGUAGE sql AS 'SELECT 1'",
        "SELECT energy.ensure_day_partitions('energy.device_rollup_1h', '2099-01-01', "
        "'2099-01-01')",
    ]
    with psycopg.connect(as_user(pg_dsn, user), autocommit=True) as conn:
        # The read-only default is a session setting a client may change; the grants are not.
        conn.execute("SET default_transaction_read_only = off")
        for stmt in forbidden:
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(stmt)
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM energy.devices").fetchone()[0] == 3
        assert conn.execute("SELECT sum(energy_wh_sum) FROM energy.device_rollup_1m").fetchone()[
            0
        ] == pytest.approx(118.7)


@pytest.fixture
def dagster_storage(pg_server: LocalPostgres, logins) -> Iterator[tuple[str, str]]:
    """Dagster's instance storage as deployed: its own database, owned by the login in
    DAGSTER_PG_URL, with the tables dagster-postgres creates (runs, event logs)."""
    from dagster_postgres.event_log import PostgresEventLogStorage
    from dagster_postgres.run_storage import PostgresRunStorage

    owner = logins("dagster")
    name = f"dagster_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(name), sql.Identifier(owner)
            )
        )
    url = "postgresql+psycopg2://" + as_user(pg_server.dsn(name), owner).split("://", 1)[1]
    runs = PostgresRunStorage(url)
    events = PostgresEventLogStorage(url)
    runs.dispose()
    events.dispose()
    yield pg_server.dsn(name), owner
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def test_bi_reader_cannot_read_dagster_storage(dagster_storage, logins):
    dsn, owner = dagster_storage
    owner_dsn = as_user(dsn, owner)
    bi_dsn = as_user(dsn, logins("bi", BI_LOGIN_SQL))
    with psycopg.connect(owner_dsn) as conn:
        tables = [
            r[0]
            for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        ]
        database = conn.execute("SELECT current_database()").fetchone()[0]
    assert {"runs", "event_logs"} <= set(tables)
    # PostgreSQL lets every role connect to a new database (CONNECT is granted to PUBLIC), but
    # none of Dagster's tables is granted to anyone but their owner.
    with psycopg.connect(bi_dsn, autocommit=True) as conn:
        for table in tables:
            with pytest.raises(
                errors.InsufficientPrivilege, match=f"^permission denied for table {table}$"
            ):
                conn.execute(
                    sql.SQL("SELECT 1 FROM public.{} LIMIT 1").format(sql.Identifier(table))
                )
    # README's hardening step for the Dagster database: only its owner connects.
    with psycopg.connect(owner_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(sql.Identifier(database))
        )
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        psycopg.connect(bi_dsn).close()
    with psycopg.connect(owner_dsn) as conn:  # the owner still does
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 0


def test_views_carry_the_registry_metadata(pg_dsn, logins):
    seed(pg_dsn)
    user = logins("bi", BI_LOGIN_SQL)
    with psycopg.connect(as_user(pg_dsn, user), autocommit=True) as conn:
        minute = conn.execute(
            "SELECT device_id, household_id, tag_household_id, device_name, device_model, "
            "device_location, device_profile, timezone, bucket, energy_wh_sum, rejected_count "
            "FROM energy.bi_device_minute ORDER BY device_id"
        ).fetchall()
        household = conn.execute(
            "SELECT household_id, timezone, devices_registered, bucket, device_count, "
            "energy_wh_sum, power_w_peak, minutes_covered, minutes_expected "
            "FROM energy.bi_household_5m"
        ).fetchall()
        hour = conn.execute(
            "SELECT device_id, household_id, device_name, device_location, timezone, bucket, "
            "energy_wh_sum, minutes_covered, minutes_expected FROM energy.bi_device_hour"
        ).fetchall()
        households = conn.execute(
            "SELECT household_id, devices_registered, timezone FROM energy.bi_households "
            "ORDER BY household_id"
        ).fetchall()
        bucket_type = conn.execute(
            "SELECT DISTINCT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
            "WHERE a.attname = 'bucket' AND a.attrelid = ANY(%s::regclass[])",
            ([f"energy.{v}" for v in BI_VIEWS - {"bi_households", "fresh_as_of"}],),
        ).fetchall()
    assert bucket_type == [("timestamp with time zone",)]
    # d1's minute carried a stale household tag: the registered household is the one shown.
    assert minute == [
        ("d1", "h1", "h-old", "Fridge", "F-100", "Kitchen", "fridge", "Europe/Berlin", T0, 2, 1),
        ("d3", "h2", "h2", "Charger", "EV-2", "Garage", "ev_charger", "America/New_York", T0,
         116.7, 0),
    ]  # fmt: skip
    assert household == [("h1", "Europe/Berlin", 2, T0, 2, 40, 520, 4, 5)]
    assert hour == [("d2", "h1", "Heat pump", "Cellar", "Europe/Berlin", T0, 300, 60, 60)]
    assert households == [("h1", 2, "Europe/Berlin"), ("h2", 1, "America/New_York")]


def test_household_timezone_is_the_one_most_of_its_devices_have(pg_dsn):
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO energy.devices (device_id, household_id, timezone) VALUES "
            "('a', 'h', 'Europe/Paris'), ('b', 'h', 'Europe/Berlin'), ('c', 'h', 'Europe/Paris'),"
            "('d', 'tie', 'Europe/Paris'), ('e', 'tie', 'Europe/Berlin')"
        )
        rows = conn.execute(
            "SELECT household_id, devices_registered, timezone FROM energy.bi_households "
            "ORDER BY household_id"
        ).fetchall()
    assert rows == [("h", 3, "Europe/Paris"), ("tie", 2, "Europe/Berlin")]


def minutes(*offsets: int) -> list[datetime]:
    return [T0 + timedelta(minutes=m) for m in offsets]


def test_fresh_as_of_names_the_newest_complete_bucket_per_table(pg_dsn, logins):
    user = logins("bi", BI_LOGIN_SQL)
    bi_dsn = as_user(pg_dsn, user)
    order = [
        "device_rollup_1m",
        "quarantine",
        "household_rollup_5m",
        "device_rollup_1h",
        "household_daily_report",
    ]

    def fresh() -> dict[str, tuple]:
        with psycopg.connect(bi_dsn) as conn:
            rows = conn.execute(
                "SELECT table_name, grain, newest_bucket, fresh_through, computed_at, "
                "lag = now() - fresh_through, missing_24h FROM energy.fresh_as_of "
                "ORDER BY table_name"
            ).fetchall()
        # The view is a UNION ALL without ORDER BY: its rows come in no promised order.
        assert [r[0] for r in rows] == sorted(order)
        return {r[0]: r[1:] for r in rows}

    # Nothing rolled up yet: every table is listed, with no bucket.
    empty = fresh()
    assert {name: row[1:] for name, row in empty.items()} == dict.fromkeys(
        order, (None, None, None, None, None)
    )

    # Minutes 10:00-10:12 with 10:05, 10:10 and 10:11 missing; 10:12 was computed last.
    present = minutes(0, 1, 2, 3, 4, 6, 7, 8, 9, 12)
    windows = [
        # 10:00 covered every minute; 10:05 and 10:10 are missing some.
        ("household_rollup_5m", T0, 5, 5, T0 + timedelta(minutes=5, seconds=9)),
        ("household_rollup_5m", T0 + timedelta(minutes=5), 4, 5, T0 + timedelta(minutes=10)),
        ("household_rollup_5m", T0 + timedelta(minutes=10), 1, 5, T0 + timedelta(minutes=15)),
        ("device_rollup_1h", T0 - timedelta(hours=2), 60, 60, T0 - timedelta(minutes=59)),
        ("device_rollup_1h", T0 - timedelta(hours=1), 58, 60, T0 + timedelta(minutes=1)),
    ]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO energy.rollup_minutes (bucket, points_read, power_w_points, "
                "energy_wh_points, duplicates_dropped, rejected, devices, computed_at) "
                "VALUES (%s, 60, 60, 60, 0, 0, 1, %s)",
                [(m, m + timedelta(seconds=7)) for m in present],
            )
            cur.executemany(
                "INSERT INTO energy.rollup_windows (grain, bucket, minutes_covered, "
                "minutes_expected, computed_at) VALUES (%s, %s, %s, %s, %s)",
                windows,
            )
    got = fresh()
    newest_minute = T0 + timedelta(minutes=12)
    minute_row = (
        timedelta(minutes=1),
        newest_minute,
        newest_minute + timedelta(minutes=1),
        newest_minute + timedelta(seconds=7),
        True,
        3,  # 10:05, 10:10, 10:11 (the ledger starts at 10:00)
    )
    assert got["device_rollup_1m"] == minute_row
    assert got["quarantine"] == minute_row
    assert got["household_rollup_5m"] == (
        timedelta(minutes=5),
        T0,
        T0 + timedelta(minutes=5),
        T0 + timedelta(minutes=5, seconds=9),
        True,
        0,  # the complete windows start at 10:00
    )
    assert got["device_rollup_1h"] == (
        timedelta(hours=1),
        T0 - timedelta(hours=2),
        T0 - timedelta(hours=1),
        T0 - timedelta(minutes=59),
        True,
        0,
    )

    # The hour's missing minutes are rolled up; the window is recomputed complete.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE energy.rollup_windows SET minutes_covered = 60, computed_at = %s "
            "WHERE grain = 'device_rollup_1h' AND bucket = %s",
            (T0 + timedelta(minutes=20), T0 - timedelta(hours=1)),
        )
    assert fresh()["device_rollup_1h"][1:4] == (
        T0 - timedelta(hours=1),
        T0,
        T0 + timedelta(minutes=20),
    )

    # Daily reports: the newest day generated, whatever order the days were generated in.
    report_day = DAY - timedelta(days=1)
    generated = [
        (report_day.date(), T0 - timedelta(hours=2)),
        (report_day.date() - timedelta(days=1), T0),  # an older day, regenerated later
    ]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.cursor().executemany(
            "INSERT INTO energy.report_days (day, households, generated_at) VALUES (%s, 2, %s)",
            generated,
        )
    assert fresh()["household_daily_report"] == (
        timedelta(days=1),
        report_day,
        DAY,
        T0 - timedelta(hours=2),
        True,
        0,
    )


def test_fresh_as_of_counts_missing_buckets_over_24_hours_only(pg_dsn):
    # A ledger older than a day: only the 24 hours ending at the newest bucket count.
    newest = T0
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO energy.rollup_minutes (bucket, points_read, power_w_points, "
            "energy_wh_points, duplicates_dropped, rejected, devices, computed_at) "
            "SELECT m, 1, 1, 1, 0, 0, 1, m FROM generate_series("
            "%(n)s::timestamptz - interval '2 days', %(n)s::timestamptz, interval '1 minute') m "
            "WHERE m NOT IN (%(n)s::timestamptz - interval '1 hour', "
            "                %(n)s::timestamptz - interval '30 hours')",
            {"n": newest},
        )
        row = conn.execute(
            "SELECT newest_bucket, missing_24h FROM energy.fresh_as_of "
            "WHERE table_name = 'device_rollup_1m'"
        ).fetchone()
    assert row == (newest, 1)


def scans(plan: dict) -> list[dict]:
    """Every node of an EXPLAIN (FORMAT JSON) plan that reads a relation."""
    found = [plan] if "Relation Name" in plan else []
    for child in plan.get("Plans", []):
        found += scans(child)
    return found


def test_dashboard_queries_are_answered_from_the_indexes_alone(pg_dsn):
    """The benchmark's three BI queries read no heap page once the rows are vacuumed: the
    rollups' indexes carry every column they ask for (migrations 0004 and 0009)."""
    from energy_pipeline.devtools.bench.reads import READ_QUERIES, READ_TABLES

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        # VACUUM marks a page all-visible only once the commits on it are flushed to WAL, which
        # the test cluster's asynchronous commit would leave for later.
        conn.execute("SET synchronous_commit = on")
        conn.execute(
            "INSERT INTO energy.device_rollup_1m SELECT 'd' || d, b, 'h' || d %% 3, 60, d, 0, "
            "2 * d, d / 60.0, 0, now() FROM generate_series(%s::timestamptz, %s, '1 minute') b, "
            "generate_series(0, 29) d",
            (DAY, DAY + timedelta(hours=23, minutes=59)),
        )
        conn.execute(
            "INSERT INTO energy.household_rollup_5m SELECT 'h' || h, b, 10, 600, 5, 300, 400, "
            "now() FROM generate_series(%s::timestamptz, %s, '5 minutes') b, "
            "generate_series(0, 2) h",
            (DAY, DAY + timedelta(hours=23, minutes=55)),
        )
        conn.execute(
            "INSERT INTO energy.device_rollup_1h SELECT 'd' || d, b, 'h' || d %% 3, 3600, d, 0, "
            "2 * d, d, 0, now() FROM generate_series(%s::timestamptz, %s, '1 hour') b, "
            "generate_series(0, 29) d",
            (DAY, DAY + timedelta(hours=23)),
        )
        for table in READ_TABLES.values():
            conn.execute(f"VACUUM (ANALYZE) {table}")
        # Small tables tempt the planner into scanning whole partitions: ask for index paths, and
        # see whether they need the heap.
        conn.execute("SET enable_seqscan = off")
        conn.execute("SET enable_bitmapscan = off")
        params = {"h": "h1", "d": "d7", "s": DAY, "e": DAY + timedelta(days=1)}
        for name, (query, _raw) in READ_QUERIES.items():
            row = conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {query}", params).fetchone()
            assert row is not None
            nodes = scans(row[0][0]["Plan"])
            assert nodes, name
            for node in nodes:
                assert node["Node Type"] == "Index Only Scan", (name, node["Node Type"])
                assert node["Heap Fetches"] == 0, (name, node["Relation Name"])
            assert sum(node["Actual Rows"] for node in nodes) > 0, name


def nodes(plan: dict) -> list[dict]:
    """Every node of an EXPLAIN (FORMAT JSON) plan, subplans included."""
    found = [plan]
    for child in plan.get("Plans", []):
        found += nodes(child)
    return found


# A household's day at 5-minute grain with its completeness, and a device's day by the hour.
COARSE_VIEW_READS = {
    "bi_household_5m": "SELECT bucket, energy_wh_sum, minutes_covered, minutes_expected "
    "FROM energy.bi_household_5m WHERE household_id = 'h1' AND bucket >= %(s)s AND bucket < %(e)s "
    "ORDER BY bucket",
    "bi_device_hour": "SELECT bucket, energy_wh_sum, minutes_covered, minutes_expected "
    "FROM energy.bi_device_hour WHERE device_id = 'd1' AND bucket >= %(s)s AND bucket < %(e)s "
    "ORDER BY bucket",
}


def _coarse_view_plans(conn: psycopg.Connection) -> dict[str, tuple[list[dict], list[tuple]]]:
    params = {"s": DAY, "e": DAY + timedelta(days=1)}
    found = {}
    for view, query in COARSE_VIEW_READS.items():
        row = conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {query}", params).fetchone()
        assert row is not None
        found[view] = (nodes(row[0][0]["Plan"]), conn.execute(query, params).fetchall())
    return found


def test_coarse_views_look_up_each_window_and_stay_serial_with_a_long_ledger(pg_dsn):
    """The completeness columns cost one ledger probe per row read (migration 0012), however
    many windows the ledger holds, and do not tip a small read into a parallel plan."""
    from energy_pipeline.migrations import downgrade, upgrade

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO energy.household_rollup_5m SELECT 'h' || h, b, 3, 900, 5, 300, 400, "
            "now() FROM generate_series(%s::timestamptz, %s, '5 minutes') b, "
            "generate_series(0, 299) h",
            (DAY, DAY + timedelta(hours=23, minutes=55)),
        )
        conn.execute(
            "INSERT INTO energy.device_rollup_1h SELECT 'd' || d, b, 'h1', 3600, 2, 1, 3, 2, 0, "
            "now() FROM generate_series(%s::timestamptz, %s, '1 hour') b, generate_series(0, 2) d",
            (DAY, DAY + timedelta(hours=23)),
        )
        # A year of windows in the ledger; the day read covered all of its minutes but one.
        for grain, expected in (("household_rollup_5m", 5), ("device_rollup_1h", 60)):
            step = timedelta(minutes=expected)
            last = DAY + timedelta(days=1) - step
            conn.execute(
                "INSERT INTO energy.rollup_windows (grain, bucket, minutes_covered, "
                "minutes_expected, computed_at) SELECT %s, b, "
                "CASE WHEN b = %s THEN %s - 1 ELSE %s END, %s, now() "
                "FROM generate_series(%s::timestamptz - interval '365 days', %s, %s) b",
                (grain, DAY, expected, expected, expected, DAY, last, step),
            )
        conn.execute(
            "ANALYZE energy.rollup_windows, energy.household_rollup_5m, energy.device_rollup_1h"
        )
        # What a production-sized partition index would let the planner do with these reads.
        conn.execute("SET min_parallel_index_scan_size = 0")
        conn.execute("SET min_parallel_table_scan_size = 0")
        now = _coarse_view_plans(conn)
        downgrade(pg_dsn, "0011")
        try:
            joined = _coarse_view_plans(conn)
        finally:
            upgrade(pg_dsn)

    for view, (plan, rows) in now.items():
        expected_rows = 288 if view == "bi_household_5m" else 24
        expected_minutes = 5 if view == "bi_household_5m" else 60
        assert len(rows) == expected_rows, view
        assert rows[0][2:] == (expected_minutes - 1, expected_minutes), view
        assert {r[2:] for r in rows[1:]} == {(expected_minutes, expected_minutes)}, view
        types = {n["Node Type"] for n in plan}
        assert "Gather" not in types and "Gather Merge" not in types, (view, types)
        ledger = [n for n in plan if n.get("Relation Name") == "rollup_windows"]
        # Two probes (covered, expected) per row read, each one index lookup.
        assert {n["Node Type"] for n in ledger} == {"Index Scan"}, view
        assert sum(n["Actual Loops"] for n in ledger) == 2 * expected_rows, view
        # The same answers as with the join the views had before.
        assert joined[view][1] == rows, view
    # With the join, the household day went parallel or hashed the ledger's whole year.
    old = {n["Node Type"] for n in joined["bi_household_5m"][0]}
    assert old & {"Gather", "Gather Merge", "Hash"}, old


README_BI_SECTION = "## Reading the rollups from BI tools"
# The household README's example queries name; a Grafana panel puts '$household' there instead.
README_HOUSEHOLD = "hh-0007"
HOUSEHOLD_TZ = "Pacific/Honolulu"  # UTC-10, no daylight saving time
# A BI tool's session may run in any timezone. This one is UTC+14, a whole day ahead of the
# household's: the session's date is never the household's.
SESSION_TZ = "Pacific/Kiritimati"


def readme_example_queries() -> list[str]:
    """The SELECT statements of the fenced `sql` blocks in README's BI section, in order (the
    section's other statement, a REVOKE, is a hardening step, not an example)."""
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert f"\n{README_BI_SECTION}\n" in readme, f"README has no section {README_BI_SECTION!r}"
    section = readme.split(f"\n{README_BI_SECTION}\n", 1)[1].split("\n## ", 1)[0]
    queries = []
    for block in re.findall(r"^```sql\n(.*?)^```", section, re.S | re.M):
        for statement in block.split(";"):
            code = [line for line in statement.splitlines() if not line.lstrip().startswith("--")]
            if "\n".join(code).strip().upper().startswith("SELECT"):
                queries.append(statement.strip())
    return queries


def seed_readme_rows(dsn: str, now: datetime) -> tuple[list[tuple], list[tuple], list[tuple]]:
    """Rollup rows around `now` for README's household and one other: 5-minute rows over the last
    three days (with complete, incomplete and unrecorded windows) and hourly rows from nine days
    back to the next hour. Returns the household rows, the window rows and the hourly rows as
    inserted."""
    devices = [
        # The household's timezone is its devices' majority one; p5, its biggest consumer, has
        # another, which must not move the household's week.
        *[(f"p{k}", README_HOUSEHOLD, f"Device {k}", f"Room {k}", HOUSEHOLD_TZ) for k in range(5)],
        ("p5", README_HOUSEHOLD, "Device 5", "Room 5", "Asia/Tokyo"),
        ("q0", "hh-0008", "Other", "Hall", "Europe/Berlin"),
    ]
    first_5m = datetime.fromtimestamp((now - timedelta(days=3)).timestamp() // 300 * 300, UTC)
    buckets_5m = [first_5m + timedelta(minutes=5 * i) for i in range(3 * 288 + 1)]
    household_rows = [
        (household, bucket, energy + i % 50 + 0.5, 100.0 + i % 13, 200.0 + i % 17)
        for i, bucket in enumerate(buckets_5m)
        for household, energy in ((README_HOUSEHOLD, 0), ("hh-0008", 1000))
    ]
    # Every third window has no ledger row; of the others, half were computed without a minute.
    window_rows = [
        ("household_rollup_5m", bucket, 5 if i % 3 == 1 else 4, 5)
        for i, bucket in enumerate(buckets_5m)
        if i % 3
    ]
    first_1h = (now - timedelta(days=9)).replace(minute=0, second=0, microsecond=0)
    # Through the next hour too: a week or day starting between seeding and querying has rows.
    buckets_1h = [first_1h + timedelta(hours=i) for i in range(9 * 24 + 2)]
    # Device p<k> uses more than p<k-1> in every hour, so the ranking never ties.
    hour_rows = [
        (device, bucket, household, 100.0 * (k + 1) + i % 5, 1000.0 * (k + 1) + i % 7)
        for i, bucket in enumerate(buckets_1h)
        for k, (device, household, *_) in enumerate(devices)
    ]
    today = now.astimezone(UTC).date()
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        for table in ("household_rollup_5m", "device_rollup_1h"):
            cur.execute(
                "SELECT energy.ensure_day_partitions(%s::regclass, %s, %s)",
                (f"energy.{table}", today - timedelta(days=10), today + timedelta(days=1)),
            )
        cur.executemany(
            "INSERT INTO energy.devices (device_id, household_id, name, location, timezone) "
            "VALUES (%s, %s, %s, %s, %s)",
            devices,
        )
        cur.executemany(
            "INSERT INTO energy.household_rollup_5m (household_id, bucket, device_count, "
            "sample_count, energy_wh_sum, power_w_avg, power_w_peak, computed_at) "
            "VALUES (%s, %s, 5, 300, %s, %s, %s, now())",
            household_rows,
        )
        cur.executemany(
            "INSERT INTO energy.rollup_windows (grain, bucket, minutes_covered, minutes_expected, "
            "computed_at) VALUES (%s, %s, %s, %s, now())",
            window_rows,
        )
        cur.executemany(
            "INSERT INTO energy.device_rollup_1h (device_id, bucket, household_id, sample_count, "
            "power_w_avg, power_w_min, power_w_max, energy_wh_sum, rejected_count, computed_at) "
            "VALUES (%s, %s, %s, 3600, 0, 0, %s, %s, 0, now())",
            [(d, b, h, peak, energy) for d, b, h, energy, peak in hour_rows],
        )
    return household_rows, window_rows, hour_rows


def kwh(wh: float, places: str) -> Decimal:
    """`round(wh::numeric / 1000, n)` as PostgreSQL computes it (half away from zero)."""
    return (Decimal(wh) / 1000).quantize(Decimal(places), rounding=ROUND_HALF_UP)


def local_midnight(day: date, tz: ZoneInfo) -> datetime:
    return datetime.combine(day, time(), tz)


def test_readme_bi_queries_give_the_household_day_top_devices_and_fleet_hours(pg_dsn, logins):
    """README's three example queries, run as written by a `bi_reader` login whose session is in
    another timezone than the household, answer what is computed here from the seeded rows.

    The queries name household `hh-0007` literally, which is seeded under that id; their time
    bounds come from `now()`, which is the same for every statement of one transaction, so the
    expected answers are computed from the `now()` read in the transaction that runs them.
    """
    queries = readme_example_queries()
    assert len(queries) == 3, (
        f"README's section {README_BI_SECTION!r} should hold exactly three example queries "
        f"in fenced sql blocks; found {len(queries)}: {queries}"
    )
    day_query, top_query, fleet_query = queries
    for query in (day_query, top_query):
        assert f"'{README_HOUSEHOLD}'" in query, f"no household {README_HOUSEHOLD!r} in {query}"
    household_rows, window_rows, hour_rows = seed_readme_rows(pg_dsn, datetime.now(UTC))

    user = logins("bi", BI_LOGIN_SQL)
    with psycopg.connect(as_user(pg_dsn, user)) as conn:
        conn.execute(sql.SQL("SET TIME ZONE {}").format(sql.Literal(SESSION_TZ)))
        now = conn.execute("SELECT now()").fetchone()[0]
        day = conn.execute(day_query).fetchall()
        top = conn.execute(top_query).fetchall()
        fleet = conn.execute(fleet_query).fetchall()

    tz = ZoneInfo(HOUSEHOLD_TZ)
    local_today = now.astimezone(tz).date()
    assert now.astimezone(ZoneInfo(SESSION_TZ)).date() != local_today

    # Yesterday in the household's timezone, 5-minute rows, `complete` NULL without a window row.
    start = local_midnight(local_today - timedelta(days=1), tz)
    end = local_midnight(local_today, tz)
    windows = {bucket: covered == expected for _, bucket, covered, expected in window_rows}
    expected_day = [
        (bucket.astimezone(tz).replace(tzinfo=None), energy, avg, peak, windows.get(bucket))
        for household, bucket, energy, avg, peak in household_rows
        if household == README_HOUSEHOLD and start <= bucket < end
    ]
    assert len(expected_day) == 288  # the seeded rows cover the whole day
    assert day == expected_day

    # Devices of the household since Monday 00:00 in its timezone: the five biggest, in kWh.
    week_start = local_midnight(local_today - timedelta(days=local_today.weekday()), tz)
    energy_wh: dict[str, float] = defaultdict(float)
    peak_w: dict[str, float] = defaultdict(float)
    for device, bucket, household, energy, peak in hour_rows:
        if household == README_HOUSEHOLD and bucket >= week_start:
            energy_wh[device] += energy
            peak_w[device] = max(peak_w[device], peak)
    expected_top = sorted(
        (
            (device, f"Device {device[1]}", f"Room {device[1]}", kwh(wh, "0.01"), peak_w[device])
            for device, wh in energy_wh.items()
        ),
        key=lambda row: (-row[3], row[0]),
    )[:5]
    assert [row[0] for row in expected_top] == ["p5", "p4", "p3", "p2", "p1"]
    assert top == expected_top

    # Every device's hourly rows of the last 24 hours, per hour.
    per_hour: dict[datetime, list[float]] = defaultdict(list)
    for _device, bucket, _household, energy, _peak in hour_rows:
        if bucket >= now - timedelta(hours=24):
            per_hour[bucket].append(energy)
    expected_fleet = [
        (bucket, kwh(sum(energies), "0.1"), len(energies))
        for bucket, energies in sorted(per_hour.items())
    ]
    assert len(expected_fleet) >= 23
    assert fleet == expected_fleet
