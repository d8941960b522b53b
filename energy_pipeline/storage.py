"""PostgreSQL side of the pipeline: device registry, minute-window replacement, ledger reads.

All SQL is parameterised; frames go in through COPY. No Dagster here.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterable
from datetime import date, datetime, timedelta

import polars as pl
import psycopg
from psycopg import sql

from energy_pipeline.config import dsn_secrets, scrub
from energy_pipeline.config import redact_dsn as redact_dsn  # re-exported for the command line
from energy_pipeline.schemas import (
    CHECKSUM_COLUMNS,
    CHECKSUM_SCHEMA,
    LEDGER_COLUMNS,
    QUARANTINE_SCHEMA,
    ROLLUP_COLUMNS,
)

SOURCE_MINUTE_ROLLUP = "device_rollup_1m"
DEVICE_COLUMNS = ("device_id", "household_id", "name", "model", "location", "timezone", "profile")
# All writers of minute windows take this lock, so two runs of the same minutes serialise and the
# second one replaces the first one's rows instead of failing on the primary key.
MINUTE_WRITE_LOCK = "energy.device_rollup_1m:write"
# Partitions are created this many days ahead of the newest day written.
PARTITION_DAYS_AHEAD = 2
# Creating a partition waits at most this long for its locks, and is tried this many times, so a
# long transaction on the parent table makes it fail clearly instead of hanging with readers
# queued behind it.
PARTITION_LOCK_TIMEOUT_MS = 2000
PARTITION_ATTEMPTS = 3


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
    except psycopg.Error as exc:
        message = connect_error_message(dsn, exc)
    # Raised outside the `except`: a chained psycopg error would carry libpq's text, which can
    # quote the DSN, into tracebacks, Dagster's event log and the daemon log.
    raise StorageError(message)


def connect_error_message(dsn: str, exc: BaseException) -> str:
    """Why connecting failed, naming host and database but never the DSN's password."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return (
            "cannot connect to PostgreSQL: the connection string is not valid (a URL password "
            "must percent-encode characters such as % @ / :, e.g. % as %25)"
        )
    where = f"host {params.get('host', '?')}, database {params.get('dbname', '?')}"
    detail = scrub(str(exc), dsn_secrets(dsn)).strip()
    return f"cannot connect to PostgreSQL ({where}): {detail}"


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
    """Create the day partitions of `energy.<table>` covering first..last plus the days ahead.

    Runs in the caller's transaction; writers use `prepare_partitions` instead, before theirs.
    """
    cur.execute(
        "SELECT energy.ensure_day_partitions(%s::regclass, %s::date, %s::date)",
        (f"energy.{table}", first.date(), (last + timedelta(days=PARTITION_DAYS_AHEAD)).date()),
    )


def missing_partition_days(
    conn: psycopg.Connection, table: str, first_day: date, last_day: date
) -> list[date]:
    """UTC days in first_day..last_day without a partition of `energy.<table>` (no locks taken)."""
    rows = conn.execute(
        "SELECT d::date FROM generate_series(%s::date, %s::date, interval '1 day') AS d "
        "WHERE to_regclass(format('energy.%%I', %s || '_p' || to_char(d, 'YYYYMMDD'))) IS NULL "
        "ORDER BY d",
        (first_day, last_day, table),
    ).fetchall()
    return [r[0] for r in rows]


def create_partitions(
    conn: psycopg.Connection,
    table: str,
    first_day: date,
    last_day: date,
    *,
    lock_timeout_ms: int = PARTITION_LOCK_TIMEOUT_MS,
    attempts: int = PARTITION_ATTEMPTS,
) -> int:
    """Create the missing day partitions first_day..last_day of `energy.<table>` in a short
    transaction of its own; returns how many were created.

    Waits for locks at most `lock_timeout_ms` per attempt, then raises a StorageError.
    """
    for attempt in range(attempts):
        try:
            with conn.transaction(), conn.cursor() as cur:
                cur.execute(
                    sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(lock_timeout_ms))
                )
                cur.execute(
                    "SELECT energy.ensure_day_partitions(%s::regclass, %s::date, %s::date)",
                    (f"energy.{table}", first_day, last_day),
                )
                row = cur.fetchone()
                return int(row[0]) if row else 0
        except psycopg.errors.LockNotAvailable:
            if attempt + 1 < attempts:
                time.sleep(0.2 * 2**attempt)
    raise StorageError(
        f"could not create the partitions of energy.{table} for {first_day}..{last_day}: their "
        f"locks were not granted within {lock_timeout_ms} ms in {attempts} attempts (a long "
        "transaction holds a conflicting lock on the table; see pg_locks)"
    )


def prepare_partitions(
    conn: psycopg.Connection, table: str, first: datetime, last: datetime
) -> None:
    """Make sure the day partitions of first..last exist before a write, plus the days ahead.

    Only checks when they exist (one catalog query, no locks), so a write whose partitions exist
    never runs DDL. Missing days being written fail loudly if they cannot be created; missing days
    ahead are only attempted once and left to the next write.
    """
    ahead = (last + timedelta(days=PARTITION_DAYS_AHEAD)).date()
    missing = missing_partition_days(conn, table, first.date(), ahead)
    if not missing:
        return
    if missing[0] <= last.date():
        create_partitions(conn, table, missing[0], ahead)
        return
    try:
        create_partitions(conn, table, missing[0], ahead, attempts=1)
    except StorageError:
        pass  # the days ahead are not written yet: the next write tries again


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
    # Partitions come first, in their own transaction: DDL inside the write transaction would wait
    # for every open reader of the table while holding the write lock.
    prepare_partitions(conn, "device_rollup_1m", start, end - timedelta(microseconds=1))
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (MINUTE_WRITE_LOCK,))
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
    """Ledger rows (bucket, the checksums, late_points_ignored) for minutes in [start, end)."""
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL(
                "SELECT bucket, {}, late_points_ignored FROM energy.rollup_minutes "
                "WHERE bucket >= %s AND bucket < %s ORDER BY bucket"
            ).format(sql.SQL(", ").join(map(sql.Identifier, CHECKSUM_COLUMNS))),
            (start, end),
        )
        rows = cur.fetchall()
    return pl.DataFrame(
        rows,
        schema={**CHECKSUM_SCHEMA, "late_points_ignored": pl.Int64},
        orient="row",
    )


def minutes_of_registered_unknowns(
    conn: psycopg.Connection, start: datetime, end: datetime
) -> list[datetime]:
    """Minutes in [start, end) holding points quarantined as of an unknown device that is now
    registered: rolled up again, those points count."""
    # The source and reason are literals, so the partial index of migration 0014 applies.
    rows = conn.execute(
        "SELECT DISTINCT q.bucket FROM energy.quarantine q "
        f"WHERE q.source = '{SOURCE_MINUTE_ROLLUP}' AND q.bucket >= %s AND q.bucket < %s "
        "AND q.reason LIKE '%%device_id: unknown device%%' "
        "AND EXISTS (SELECT FROM energy.devices d WHERE d.device_id = q.device_id) "
        "ORDER BY q.bucket",
        (start, end),
    ).fetchall()
    return [r[0] for r in rows]


def record_out_of_range(
    conn: psycopg.Connection, counts: dict[str, int], bounds: dict[str, datetime], at: datetime
) -> None:
    """Store the latest count of raw points outside every minute partition, per side."""
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO energy.raw_out_of_range (side, bound, points, checked_at) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT (side) DO UPDATE SET bound = EXCLUDED.bound, "
            "points = EXCLUDED.points, checked_at = EXCLUDED.checked_at",
            [(side, bounds[side], n, at) for side, n in counts.items()],
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
