"""The BI read of one device's day stays an index-only scan of the partitions it needs, and the
rollup partitions carry the autovacuum settings that keep their pages all-visible (0011)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg

from energy_pipeline.devtools.bench.reads import explain_device_day
from energy_pipeline.migrations import downgrade, upgrade
from energy_pipeline.storage import create_partitions

ROLLUPS = ("device_rollup_1m", "household_rollup_5m", "device_rollup_1h")
SETTINGS = {
    "autovacuum_vacuum_insert_threshold": "1000",
    "autovacuum_vacuum_insert_scale_factor": "0",
}


def partition_options(conn: psycopg.Connection) -> dict[str, dict[str, str]]:
    """Storage parameters of every partition of the rollup tables, by partition name."""
    rows = conn.execute(
        "SELECT c.relname, coalesce(c.reloptions, '{}') FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent "
        "WHERE p.relnamespace = 'energy'::regnamespace AND p.relname = ANY(%s)",
        (list(ROLLUPS),),
    ).fetchall()
    return {name: dict(o.split("=", 1) for o in opts) for name, opts in rows}


def test_rollup_partitions_old_and_new_are_vacuumed_every_thousand_rows(pg_dsn):
    day = (datetime.now(UTC) + timedelta(days=40)).date()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        before = partition_options(conn)
        for table in ROLLUPS:
            assert create_partitions(conn, table, day, day) == 1
        after = partition_options(conn)
    assert {name.rsplit("_p", 1)[0] for name in before} == set(ROLLUPS)
    assert all(opts == SETTINGS for opts in before.values())
    new = set(after) - set(before)
    assert new == {f"{table}_p{day:%Y%m%d}" for table in ROLLUPS}
    assert all(after[name] == SETTINGS for name in new)


def test_downgrade_resets_the_settings_and_new_partitions_get_none(pg_dsn):
    day = (datetime.now(UTC) + timedelta(days=50)).date()
    downgrade(pg_dsn, "0010")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        create_partitions(conn, "device_rollup_1m", day, day)
        assert all(opts == {} for opts in partition_options(conn).values())
    upgrade(pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert all(opts == SETTINGS for opts in partition_options(conn).values())


def test_one_device_day_is_an_index_only_scan_of_two_partitions_without_heap_visits(pg_dsn):
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    start = end - timedelta(hours=24)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        create_partitions(conn, "device_rollup_1m", start.date() - timedelta(days=1), end.date())
        for (name,) in conn.execute(
            "SELECT inhrelid::regclass::text FROM pg_inherits "
            "WHERE inhparent = 'energy.device_rollup_1m'::regclass"
        ).fetchall():
            # No autovacuum during the test: the first plan is of rows no vacuum has seen yet.
            conn.execute(f"ALTER TABLE {name} SET (autovacuum_enabled = off)")
        conn.execute(
            "INSERT INTO energy.devices (device_id, household_id) "
            "SELECT 'd' || i, 'h' || i / 5 FROM generate_series(0, 99) i"
        )
        # The test cluster commits asynchronously; VACUUM marks a page all-visible only once its
        # rows' commit is flushed, which a synchronous commit makes sure of before it runs.
        conn.execute("SET synchronous_commit = on")
        # Written a minute at a time for every device, as the pipeline writes: a device's day
        # lies on as many heap pages as it has minutes.
        conn.execute(
            "INSERT INTO energy.device_rollup_1m (device_id, bucket, household_id, sample_count, "
            "power_w_avg, power_w_min, power_w_max, energy_wh_sum, computed_at) "
            "SELECT d.device_id, b, d.household_id, 60, 100, 90, 110, 1.5, now() "
            "FROM generate_series(%s::timestamptz, %s::timestamptz - interval '1 minute', "
            "interval '1 minute') b CROSS JOIN energy.devices d ORDER BY b, d.device_id",
            (start - timedelta(hours=1), end + timedelta(hours=1)),
        )
        # On tables this small the planner may prefer a bitmap scan over the heap; production's
        # partitions are thousands of times larger. The index-only path is what is examined.
        conn.execute("SET enable_bitmapscan = off")
        conn.execute("ANALYZE energy.device_rollup_1m")  # statistics, no visibility map yet
        unvacuumed = explain_device_day(conn, "d7", (start, end))
        conn.execute("VACUUM (ANALYZE) energy.device_rollup_1m")
        vacuumed = explain_device_day(conn, "d7", (start, end))
    for plan in (unvacuumed, vacuumed):
        assert plan["rows"] == 24 * 60
        assert plan["scan_types"] == ["Index Only Scan"]
        # Only the days the window touches are scanned: the other partitions are pruned.
        assert plan["partitions_scanned"] == (1 if end.hour == 0 else 2)
    # Every row not yet in the visibility map costs a heap visit; a vacuum removes them all.
    assert unvacuumed["heap_fetches"] == 24 * 60
    assert vacuumed["heap_fetches"] == 0
