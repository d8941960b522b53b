"""Storage under retention, over a simulated clock: database sizes day by day.

Each simulated day writes a small fleet's rollup rows straight into the tables (minute, 5-minute,
hourly, their ledgers, quarantine), optionally materializes a daily Dagster asset with real runs,
then runs retention as the daily job would, at that day's clock. `pg_database_size` of the
pipeline's database (and of the Dagster instance's) is recorded after each day, next to the same
load without retention.

    python -m energy_pipeline.devtools.bench.retention --days 70

runs it against the local PostgreSQL (`energy-pipeline services up`) in throwaway databases.
"""

import argparse
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

import dagster as dg
import psycopg
from psycopg import sql

from energy_pipeline.config import dagster_storage_url
from energy_pipeline.defs.retention.runs import purge_runs
from energy_pipeline.retention import PARTITIONED_TABLES, Horizon, run_retention
from energy_pipeline.storage import connect, create_partitions

START = date(2026, 1, 1)
LATENESS = timedelta(hours=2)
# Short horizons, so the sizes level off within a few weeks of simulated time.
HORIZONS = (
    Horizon("device_rollup_1m", 10, "ENERGY_RETENTION_DEVICE_ROLLUP_1M_DAYS"),
    Horizon("household_rollup_5m", 20, "ENERGY_RETENTION_HOUSEHOLD_ROLLUP_5M_DAYS"),
    Horizon("device_rollup_1h", 30, "ENERGY_RETENTION_DEVICE_ROLLUP_1H_DAYS"),
    Horizon("quarantine", 5, "ENERGY_RETENTION_QUARANTINE_DAYS"),
)
# Dagster runs older than this many simulated days are purged (the minute partition window).
RUN_WINDOW_DAYS = 5

_DAY_ROWS = """
INSERT INTO energy.device_rollup_1m (device_id, bucket, household_id, sample_count, power_w_avg,
    power_w_min, power_w_max, energy_wh_sum, computed_at)
SELECT 'dev-' || d, %(start)s + make_interval(mins => m), 'house-' || (d %% %(houses)s), 60,
       100 + d, 90, 110 + m, 1.5, %(now)s
FROM generate_series(0, %(devices)s - 1) d, generate_series(0, %(minutes)s - 1) m;

INSERT INTO energy.rollup_minutes (bucket, points_read, power_w_points, energy_wh_points,
    duplicates_dropped, rejected, devices, computed_at)
SELECT %(start)s + make_interval(mins => m), 60 * %(devices)s, 60 * %(devices)s,
       60 * %(devices)s, 0, 1, %(devices)s, %(now)s
FROM generate_series(0, %(minutes)s - 1) m;

INSERT INTO energy.household_rollup_5m (household_id, bucket, device_count, sample_count,
    energy_wh_sum, power_w_avg, power_w_peak, computed_at)
SELECT 'house-' || h, %(start)s + make_interval(mins => w * 5), 4, 1200, 30, 400, 500, %(now)s
FROM generate_series(0, %(houses)s - 1) h, generate_series(0, %(minutes)s / 5 - 1) w;

INSERT INTO energy.device_rollup_1h (device_id, bucket, household_id, sample_count, power_w_avg,
    power_w_min, power_w_max, energy_wh_sum, computed_at)
SELECT 'dev-' || d, %(start)s, 'house-' || (d %% %(houses)s), 60 * %(minutes)s, 100, 90, 110,
       90, %(now)s
FROM generate_series(0, %(devices)s - 1) d;

INSERT INTO energy.rollup_windows (grain, bucket, minutes_covered, minutes_expected,
    source_computed_at, computed_at)
SELECT 'household_rollup_5m', %(start)s + make_interval(mins => w * 5), 5, 5, %(now)s, %(now)s
FROM generate_series(0, %(minutes)s / 5 - 1) w
UNION ALL SELECT 'device_rollup_1h', %(start)s, %(minutes)s, 60, %(now)s, %(now)s;

INSERT INTO energy.quarantine (source, bucket, device_id, household_id, power_w, reason)
SELECT 'device_rollup_1m', %(start)s + make_interval(mins => m), 'dev-0', 'house-0', -5,
       'power_w: negative'
FROM generate_series(0, %(minutes)s - 1) m;
"""


@dataclass(frozen=True)
class DaySize:
    """Database sizes after one simulated day (bytes), and the runs Dagster still stores (0 and
    0 when its side is not simulated)."""

    day: int
    energy_with: int
    energy_without: int
    dagster_bytes: int = 0
    dagster_runs: int = 0


def sim_now(day: int) -> datetime:
    """Simulated clock of `day`: noon UTC of START + day."""
    return datetime.combine(START + timedelta(days=day), time(12), UTC)


def write_day(conn: psycopg.Connection, day: int, devices: int, minutes: int) -> None:
    """One simulated day's rollup rows, ledger rows and quarantine rows, in one transaction."""
    first = START + timedelta(days=day)
    for table in PARTITIONED_TABLES:
        create_partitions(conn, table, first, first + timedelta(days=1))
    params = {
        "start": datetime.combine(first, time(), UTC),
        "now": sim_now(day),
        "devices": devices,
        "houses": max(devices // 4, 1),
        "minutes": minutes,
    }
    with conn.transaction():
        for stmt in _DAY_ROWS.split(";\n\n"):
            conn.execute(stmt, params)  # type: ignore[call-overload]


def database_bytes(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    return int(row[0]) if row else 0


def vacuum(conn: psycopg.Connection) -> None:
    """What autovacuum does in the background, now: deleted rows' space becomes reusable."""
    conn.execute("VACUUM")


def simulate(
    dsn_with: str,
    dsn_without: str,
    days: int,
    devices: int = 20,
    minutes: int = 30,
    dagster_day: Callable[[int], tuple[int, int]] | None = None,
    progress: Callable[[DaySize], object] | None = None,
) -> list[DaySize]:
    """`days` simulated days into two migrated databases: retention runs daily on the first,
    never on the second. `dagster_day(day)`, when given, runs that day's Dagster side and returns
    the Dagster database's size and the runs it still stores."""
    sizes = []
    with connect(dsn_with) as with_ret, connect(dsn_without) as without:
        for day in range(days):
            for conn in (with_ret, without):
                write_day(conn, day, devices, minutes)
            run_retention(with_ret, HORIZONS, LATENESS, sim_now(day))
            for conn in (with_ret, without):
                vacuum(conn)
            dagster = dagster_day(day) if dagster_day else (0, 0)
            size = DaySize(day, database_bytes(with_ret), database_bytes(without), *dagster)
            sizes.append(size)
            if progress:
                progress(size)
    return sizes


@dg.asset(partitions_def=dg.DailyPartitionsDefinition(start_date=START.isoformat()))
def daily_sample(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """One materialization per simulated day, standing in for the pipeline's runs."""
    return dg.MaterializeResult(metadata={"partition": context.partition_key})


class DagsterSide:
    """The Dagster instance's share of a simulated day: real runs, dated by the simulated clock,
    then the run purge the retention job does (runs older than RUN_WINDOW_DAYS, except those the
    status of a partition still in the moving window rests on)."""

    def __init__(self, instance: dg.DagsterInstance, dsn: str, runs_per_day: int = 1) -> None:
        self.instance, self.dsn, self.runs_per_day = instance, dsn, runs_per_day

    def __call__(self, day: int) -> tuple[int, int]:
        now = sim_now(day)
        key = (START + timedelta(days=day)).isoformat()
        with connect(self.dsn) as conn:
            for _ in range(self.runs_per_day):
                run_id = dg.materialize([daily_sample], instance=self.instance, partition_key=key)
                # The runs table stores naive UTC; the purge filters on this creation time.
                conn.execute(
                    "UPDATE runs SET create_timestamp = %s WHERE run_id = %s",
                    (now.replace(tzinfo=None), run_id.run_id),
                )
            first = max(START, (now - timedelta(days=RUN_WINDOW_DAYS)).date())
            window = dg.DailyPartitionsDefinition(start_date=first.isoformat())
            purge_runs(
                self.instance,
                {daily_sample.key: window},
                now - timedelta(days=RUN_WINDOW_DAYS),
                now,
            )
            vacuum(conn)
            return database_bytes(conn), len(self.instance.get_run_records())


def format_sizes(sizes: list[DaySize]) -> str:
    """A per-day table of the sizes in MB."""
    lines = [
        f"{'day':>4} {'energy MB (retention)':>22} {'energy MB (none)':>17} "
        f"{'dagster MB (purged)':>20} {'dagster runs kept':>18}"
    ]
    for s in sizes:
        lines.append(
            f"{s.day:>4} {s.energy_with / 1e6:>22.2f} {s.energy_without / 1e6:>17.2f} "
            f"{s.dagster_bytes / 1e6:>20.2f} {s.dagster_runs:>18}"
        )
    return "\n".join(lines)


@contextmanager
def scratch_databases(admin_dsn: str, count: int) -> Iterator[list[str]]:
    """`count` migrated throwaway databases on the server of `admin_dsn`, dropped afterwards."""
    from energy_pipeline.migrations import upgrade

    names = [f"retention_bench_{uuid.uuid4().hex[:8]}" for _ in range(count)]
    dsns = [psycopg.conninfo.make_conninfo(admin_dsn, dbname=n) for n in names]
    with connect(admin_dsn) as admin:
        for name in names:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        for dsn in dsns:
            upgrade(dsn)
        yield dsns
    finally:
        with connect(admin_dsn) as admin:
            for name in names:
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=70)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--minutes", type=int, default=30, help="minutes written per day")
    parser.add_argument(
        "--admin-dsn",
        default="postgresql://postgres@127.0.0.1:15432/postgres",
        help="a server where throwaway databases may be created",
    )
    parser.add_argument(
        "--dagster-runs", type=int, default=1, help="real Dagster runs per day (0: none)"
    )
    args = parser.parse_args(argv)
    with scratch_databases(args.admin_dsn, 3) as (with_ret, without, dagster_db):
        url = dagster_storage_url(dagster_db)
        overrides = {"storage": {"postgres": {"postgres_url": url}}}
        with dg.instance_for_test(overrides=overrides) as instance:
            side = (
                DagsterSide(instance, dagster_db, args.dagster_runs) if args.dagster_runs else None
            )
            sizes = simulate(
                with_ret,
                without,
                args.days,
                args.devices,
                args.minutes,
                dagster_day=side,
                progress=lambda size: sys.stderr.write(f"day {size.day} done\r"),
            )
    sys.stdout.write(format_sizes(sizes) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
