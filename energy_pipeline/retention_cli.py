"""`energy-pipeline retention [--dry-run] [--apply-influx-policy] [--no-dagster]`: what the daily
retention job does, from the command line, with the same per-table report."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime

from energy_pipeline.config import Settings, validate_dagster_pg_url
from energy_pipeline.influx import InfluxClient, InfluxError, quote_ident
from energy_pipeline.retention import format_report, run_retention_for
from energy_pipeline.scheduling import partitions_start
from energy_pipeline.storage import connect


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")


def add_retention_parser(sub: argparse._SubParsersAction) -> None:
    """Register the `retention` subcommand on the command line's subparsers."""
    p = sub.add_parser(
        "retention",
        help="remove what is past its horizon: day partitions, old rows, old Dagster runs",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument(
        "--apply-influx-policy",
        action="store_true",
        help="also set the raw data's retention policy to ENERGY_RAW_RETENTION_DAYS on InfluxDB "
        "(any server, external ones included)",
    )
    p.add_argument(
        "--no-dagster", action="store_true", help="leave Dagster's runs and event logs alone"
    )
    p.set_defaults(func=cmd_retention)


def default_policy(influx: InfluxClient) -> str:
    """Name of the database's default retention policy (empty if there is none)."""
    for result in influx.query_json(f"SHOW RETENTION POLICIES ON {quote_ident(influx.database)}"):
        for series in result.get("series", []):
            cols = series["columns"]
            for row in series["values"]:
                if row[cols.index("default")]:
                    return str(row[cols.index("name")])
    return ""


def influx_policy_statement(database: str, policy: str, days: int) -> str:
    """The InfluxQL that gives `policy` a duration of `days` (shards of one day)."""
    return (
        f"ALTER RETENTION POLICY {quote_ident(policy)} ON {quote_ident(database)} "
        f"DURATION {days}d SHARD DURATION 1d"
    )


def apply_influx_policy(settings: Settings, influx: InfluxClient, *, dry_run: bool) -> str:
    """Set the raw data's retention policy; returns what was (or, dry, would be) done."""
    policy = settings.influx_retention_policy or default_policy(influx)
    if not policy:
        return f"InfluxDB: database {influx.database!r} has no default retention policy; skipped"
    stmt = influx_policy_statement(influx.database, policy, settings.raw_retention_days)
    if dry_run:
        return f"InfluxDB: would run: {stmt}"
    try:
        influx.query_json(stmt)
    except InfluxError as exc:
        raise InfluxError(
            f"{exc}; InfluxDB 2.x and 3.x keep raw data per bucket or database instead: set its "
            "retention period there (README, 'Raw-data retention on an external InfluxDB')"
        ) from None
    return f"InfluxDB: {stmt}"


def _database_bytes(dsn: str) -> int:
    with connect(dsn) as conn:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    return int(row[0]) if row else 0


def _dagster_dsn(settings: Settings) -> str:
    """DAGSTER_PG_URL as psycopg reads it (dagster.yaml's `postgresql+psycopg2://` dropped), for
    measuring Dagster's database; a clear ConfigError if it is not such a URL."""
    url = validate_dagster_pg_url("DAGSTER_PG_URL", settings.dagster_pg_url)
    return "postgresql://" + url.removeprefix("postgresql+psycopg2://")


def _purge_dagster(settings: Settings, now: datetime, *, dry_run: bool) -> str:
    if not os.environ.get("DAGSTER_HOME"):
        return "Dagster runs: skipped (DAGSTER_HOME is not set)"
    import dagster as dg

    from energy_pipeline.definitions import build_definitions
    from energy_pipeline.defs.retention.runs import asset_partitions, purge_runs

    repository = build_definitions(settings, now=now).get_repository_def()
    with dg.DagsterInstance.get() as instance:
        purge = purge_runs(
            instance,
            asset_partitions(repository),
            partitions_start(now, settings.raw_retention_days),
            now,
            dry_run=dry_run,
        )
    return purge.summary()


def cmd_retention(args: argparse.Namespace, settings: Settings) -> int:
    """Run retention now and print what it removed (or, with --dry-run, would remove)."""
    from energy_pipeline.cli import _influx

    now = datetime.now(UTC)
    # Dagster's database is only read when its runs are purged; its URL is checked before
    # anything is removed.
    with_dagster = not args.no_dagster and bool(os.environ.get("DAGSTER_HOME"))
    dagster_dsn = _dagster_dsn(settings) if with_dagster else ""
    before = _database_bytes(settings.pg_dsn)
    with connect(settings.pg_dsn) as conn:
        report = run_retention_for(conn, settings, now, dry_run=args.dry_run)
    _say(format_report(report))
    after = _database_bytes(settings.pg_dsn)
    _say(f"database size (energy): {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB")
    if not args.no_dagster:
        _say(_purge_dagster(settings, now, dry_run=args.dry_run))
        if with_dagster:
            _say(f"database size (dagster): {_database_bytes(dagster_dsn) / 1e6:.1f} MB")
    if args.apply_influx_policy:
        _say(apply_influx_policy(settings, _influx(settings), dry_run=args.dry_run))
    return 0
