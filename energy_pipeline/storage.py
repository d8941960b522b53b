"""PostgreSQL side of the pipeline: device registry, minute-window replacement, ledger reads.

All SQL is parameterised; frames go in through COPY. No Dagster here.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from datetime import datetime, timedelta

import polars as pl
import psycopg
from psycopg import sql

from energy_pipeline.rollups import LEDGER_COLUMNS, QUARANTINE_SCHEMA, ROLLUP_COLUMNS

SOURCE_MINUTE_ROLLUP = "device_rollup_1m"
DEVICE_COLUMNS = ("device_id", "household_id", "name", "model", "location", "timezone", "profile")
# All writers of minute windows take this lock, so two runs of the same minutes serialise and the
# second one replaces the first one's rows instead of failing on the primary key.
MINUTE_WRITE_LOCK = "energy.device_rollup_1m:write"
# Partitions are created this many days ahead of the newest day written.
PARTITION_DAYS_AHEAD = 2


class StorageError(RuntimeError):
    """PostgreSQL is unreachable or the schema is not there."""


def connect(dsn: str, **kwargs) -> psycopg.Connection:
    """Open an autocommit connection, with a clear error when the server or database is not there.

    Autocommit makes every `with conn.transaction()` a real transaction that commits on exit; on a
    connection with an implicit transaction open (after any SELECT) psycopg would turn it into a
    savepoint and commit nothing until the connection closes.
    """
    kwargs.setdefault("autocommit", True)
    try:
        return psycopg.connect(dsn, connect_timeout=10, **kwargs)
    except psycopg.OperationalError as exc:
        host = psycopg.conninfo.conninfo_to_dict(dsn).get("host", "?")
        raise StorageError(f"cannot connect to PostgreSQL (host {host}): {exc}".strip()) from exc


def redact_dsn(dsn: str) -> str:
    """The DSN without its password, for printing."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", dsn)


def copy_frame(
    cur: psycopg.Cursor, table: str, frame: pl.DataFrame, schema: str | None = "energy"
) -> None:
    """COPY a frame into `<schema>.<table>` (its own columns) as CSV, written by Polars: no
    per-row Python. Datetimes must be UTC; `schema=None` targets a temporary or search-path table.
    """
    if frame.is_empty():
        return
    buf = io.BytesIO()
    frame.write_csv(
        buf,
        include_header=False,
        datetime_format="%Y-%m-%d %H:%M:%S%.6f+00",
        quote_style="non_numeric",
    )
    target = sql.Identifier(schema, table) if schema else sql.Identifier(table)
    stmt = sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT csv)").format(
        target, sql.SQL(", ").join(map(sql.Identifier, frame.columns))
    )
    with cur.copy(stmt) as copy:
        copy.write(buf.getvalue())


def ensure_partitions(cur: psycopg.Cursor, table: str, first: datetime, last: datetime) -> None:
    """Create the day partitions of `energy.<table>` covering first..last plus the days ahead."""
    cur.execute(
        "SELECT energy.ensure_day_partitions(%s::regclass, %s::date, %s::date)",
        (f"energy.{table}", first.date(), (last + timedelta(days=PARTITION_DAYS_AHEAD)).date()),
    )


def replace_minutes(
    conn: psycopg.Connection,
    start: datetime,
    end: datetime,
    rollups: pl.DataFrame,
    quarantine: pl.DataFrame,
    ledger: pl.DataFrame,
    computed_at: datetime,
) -> None:
    """Replace every row of [start, end) in the rollup, quarantine and ledger tables, atomically.

    Re-running a window gives the same rows; a failure anywhere rolls the whole window back.
    """
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (MINUTE_WRITE_LOCK,))
        ensure_partitions(cur, "device_rollup_1m", start, end - timedelta(microseconds=1))
        window = (start, end)
        cur.execute(
            "DELETE FROM energy.device_rollup_1m WHERE bucket >= %s AND bucket < %s", window
        )
        cur.execute(
            "DELETE FROM energy.quarantine WHERE source = %s AND bucket >= %s AND bucket < %s",
            (SOURCE_MINUTE_ROLLUP, *window),
        )
        cur.execute("DELETE FROM energy.rollup_minutes WHERE bucket >= %s AND bucket < %s", window)
        stamp = pl.lit(computed_at).dt.convert_time_zone("UTC").alias("computed_at")
        copy_frame(cur, "device_rollup_1m", rollups.select(*ROLLUP_COLUMNS, stamp))
        copy_frame(
            cur,
            "quarantine",
            quarantine.select(pl.lit(SOURCE_MINUTE_ROLLUP).alias("source"), *QUARANTINE_SCHEMA),
        )
        copy_frame(cur, "rollup_minutes", ledger.select(*LEDGER_COLUMNS, stamp))


def registered_devices(conn: psycopg.Connection) -> pl.DataFrame:
    """Registered devices as (device_id, household_id)."""
    with conn.cursor() as cur:
        cur.execute("SELECT device_id, household_id FROM energy.devices ORDER BY device_id")
        rows = cur.fetchall()
    return pl.DataFrame(
        rows, schema={"device_id": pl.String, "household_id": pl.String}, orient="row"
    )


def upsert_devices(conn: psycopg.Connection, devices: pl.DataFrame) -> int:
    """Register or update device metadata; returns the number of rows written."""
    cols = [c for c in DEVICE_COLUMNS if c in devices.columns]
    frame = devices.select(cols).unique("device_id", keep="last")
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(
            "CREATE TEMP TABLE devices_in (LIKE energy.devices INCLUDING DEFAULTS) ON COMMIT DROP"
        )
        copy_frame(cur, "devices_in", frame, schema=None)
        updates = sql.SQL(", ").join(
            sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in cols[1:]
        )
        cur.execute(
            sql.SQL(
                "INSERT INTO energy.devices ({cols}) SELECT {cols} FROM devices_in "
                "ON CONFLICT (device_id) DO UPDATE SET {updates}, updated_at = now()"
            ).format(cols=sql.SQL(", ").join(map(sql.Identifier, cols)), updates=updates)
        )
    return frame.height


def ledger_between(conn: psycopg.Connection, start: datetime, end: datetime) -> pl.DataFrame:
    """Ledger rows (bucket, power_w_points, energy_wh_points) for minutes in [start, end)."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT bucket, power_w_points, energy_wh_points, late_points_ignored "
            "FROM energy.rollup_minutes WHERE bucket >= %s AND bucket < %s ORDER BY bucket",
            (start, end),
        )
        rows = cur.fetchall()
    return pl.DataFrame(
        rows,
        schema={
            "bucket": pl.Datetime("us", "UTC"),
            "power_w_points": pl.Int64,
            "energy_wh_points": pl.Int64,
            "late_points_ignored": pl.Int64,
        },
        orient="row",
    )


def record_late_points_ignored(
    conn: psycopg.Connection, counts: Iterable[tuple[datetime, int]]
) -> None:
    """Remember how many points arrived for minutes past the lateness window (not recomputed)."""
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            "UPDATE energy.rollup_minutes SET late_points_ignored = %s WHERE bucket = %s",
            [(n, bucket) for bucket, n in counts],
        )
