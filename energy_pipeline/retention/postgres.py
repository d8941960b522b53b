"""Retention in PostgreSQL: dropping expired day partitions with their ledger rows, batched
deletes of old rows, vacuuming finished days of the rollup tables, and the whole run
(`run_retention`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

from energy_pipeline.retention.catalog import (
    DayPartition,
    check_owner,
    day_partitions,
    partition_visibility,
    relation_bytes,
)
from energy_pipeline.retention.plan import (
    DAY,
    PARTITIONED_TABLES,
    Horizon,
    PartitionVacuum,
    RetentionError,
    RetentionReport,
    cutoff,
    day_start,
    expired_days,
    horizons,
    vacuum_days,
)
from energy_pipeline.storage import create_partitions

if TYPE_CHECKING:
    from energy_pipeline.config import Settings

# Day partitions kept created ahead of today by every retention run.
PARTITION_DAYS_AHEAD = 7
# A DDL or DELETE waits this long for a lock before giving up with a RetentionError: a reader's
# long transaction makes retention fail (and run again next time) instead of queueing readers.
LOCK_TIMEOUT_MS = 5000
DELETE_BATCH_ROWS = 10_000


def _ident(*parts: str) -> sql.Identifier:
    return sql.Identifier(*parts)


# Ledger rows describing a partitioned table's buckets (table, condition on one day's [start,
# end)), removed with its day partitions: `rollup_minutes` holds the minute checksums too.
_DAY_RANGE = sql.SQL("bucket >= %s AND bucket < %s")
_LEDGERS: Mapping[str, tuple[str, sql.Composable]] = {
    "device_rollup_1m": ("rollup_minutes", _DAY_RANGE),
    **{
        grain: (
            "rollup_windows",
            sql.SQL("grain = {} AND {}").format(sql.Literal(grain), _DAY_RANGE),
        )
        for grain in ("household_rollup_5m", "device_rollup_1h")
    },
}


def _ledger_rows(conn: psycopg.Connection, table: str, day: date, *, delete: bool) -> int:
    """Count (or delete, in the caller's transaction) the ledger rows of `table`'s `day`."""
    ledger, condition = _LEDGERS[table]
    verb = sql.SQL("DELETE FROM" if delete else "SELECT count(*) FROM")
    stmt = sql.SQL("{} {} WHERE {}").format(verb, _ident("energy", ledger), condition)
    cur = conn.execute(stmt, (day_start(day), day_start(day) + DAY))
    if delete:
        return max(cur.rowcount, 0)
    row = cur.fetchone()
    return int(row[0]) if row else 0


def _locked(what: str, lock_timeout_ms: int, exc: psycopg.Error) -> RetentionError:
    return RetentionError(
        f"{what}: a lock was not granted within {lock_timeout_ms} ms (an open transaction reads "
        f"the table; see pg_stat_activity). Nothing half-done is left: the next run finishes it. "
        f"({type(exc).__name__})"
    )


def _set_lock_timeout(conn: psycopg.Connection, lock_timeout_ms: int) -> None:
    conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(lock_timeout_ms)))


def drop_day_partition(
    conn: psycopg.Connection, part: DayPartition, lock_timeout_ms: int = LOCK_TIMEOUT_MS
) -> tuple[int, int]:
    """Detach and drop one day partition, and its day's ledger rows; returns (rows in it, ledger
    rows removed).

    DETACH CONCURRENTLY only takes SHARE UPDATE EXCLUSIVE on the parent, so readers and writers of
    other days go on; it cannot run in a transaction block, hence the autocommit connection. An
    interrupted detach leaves the partition pending (finished here by FINALIZE) or detached (then
    only dropped): a second run completes what the first began.
    """
    parent, name = _ident("energy", part.parent), _ident("energy", part.name)
    _set_lock_timeout(conn, lock_timeout_ms)
    try:
        rows = _count(conn, part.name)
        if part.detach_pending:
            conn.execute(
                sql.SQL("ALTER TABLE {} DETACH PARTITION {} FINALIZE").format(parent, name)
            )
        elif part.attached:
            conn.execute(
                sql.SQL("ALTER TABLE {} DETACH PARTITION {} CONCURRENTLY").format(parent, name)
            )
        with conn.transaction():
            conn.execute(sql.SQL("DROP TABLE {}").format(name))
            removed = _ledger_rows(conn, part.parent, part.day, delete=True)
    except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled) as exc:
        raise _locked(f"dropping energy.{part.name}", lock_timeout_ms, exc) from None
    return rows, removed


def _partitioned_table(
    conn: psycopg.Connection,
    report: RetentionReport,
    h: Horizon,
    cut: datetime | None,
    lock_timeout_ms: int,
) -> None:
    t = report.table(h.table, cut)
    parts = day_partitions(conn, h.table)
    t.bytes_before = t.bytes_after = relation_bytes(conn, [p.name for p in parts])
    expired = set(expired_days((p.day for p in parts), cut))
    doomed = [p for p in parts if p.day in expired]
    if not doomed:
        return
    ledger_name = _LEDGERS[h.table][0]
    ledger = report.table(ledger_name, cut)
    if not ledger.bytes_before:
        ledger.bytes_before = ledger.bytes_after = relation_bytes(conn, [ledger_name])
    if report.dry_run:
        for p in doomed:
            t.rows_removed += _count(conn, p.name)
            ledger.rows_removed += _ledger_rows(conn, h.table, p.day, delete=False)
        t.partitions_dropped = [p.day for p in doomed]
        t.bytes_after = t.bytes_before - relation_bytes(conn, [p.name for p in doomed])
        return
    check_owner(conn, h.table)
    for p in doomed:
        rows, removed = drop_day_partition(conn, p, lock_timeout_ms)
        t.rows_removed += rows
        ledger.rows_removed += removed
        t.partitions_dropped.append(p.day)
    t.bytes_after = relation_bytes(conn, [p.name for p in day_partitions(conn, h.table)])


def _count(conn: psycopg.Connection, table: str) -> int:
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(_ident("energy", table)))
    found = row.fetchone()
    return int(found[0]) if found else 0


def delete_in_batches(
    conn: psycopg.Connection,
    table: str,
    condition: sql.Composable,
    params: Sequence[object],
    *,
    dry_run: bool,
    batch_rows: int = DELETE_BATCH_ROWS,
    lock_timeout_ms: int = LOCK_TIMEOUT_MS,
) -> int:
    """Delete the rows of `energy.<table>` matching `condition`, `batch_rows` per transaction
    (short locks, bounded WAL per commit); dry, only count them. Returns the number of rows.

    Batches pick rows by `ctid` (a TID scan), so tables without a single-column key qualify."""
    target = _ident("energy", table)
    if dry_run:
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE {}").format(target, condition), params
        ).fetchone()
        return int(row[0]) if row else 0
    stmt = sql.SQL(
        "DELETE FROM {t} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {t} WHERE {c} LIMIT {n}))"
    ).format(t=target, c=condition, n=sql.Literal(batch_rows))
    _set_lock_timeout(conn, lock_timeout_ms)
    total = 0
    try:
        while True:
            with conn.transaction():
                deleted = conn.execute(stmt, params).rowcount
            total += deleted
            if deleted < batch_rows:
                return total
    except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled) as exc:
        raise _locked(f"deleting from energy.{table}", lock_timeout_ms, exc) from None


def _vacuum(conn: psycopg.Connection, tables: Iterable[str]) -> None:
    """Make deleted rows' space reusable now, so the tables stop growing (autovacuum would do it
    later)."""
    for table in tables:
        conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(_ident("energy", table)))


def _quarantine(conn: psycopg.Connection, report: RetentionReport, cut: datetime | None) -> None:
    t = report.table("quarantine", cut)
    t.bytes_before = t.bytes_after = relation_bytes(conn, ["quarantine"])
    if cut is None:
        return
    t.rows_removed = delete_in_batches(
        conn,
        "quarantine",
        sql.SQL("bucket < %s"),
        (cut,),
        dry_run=report.dry_run,
    )


def _daily_reports(conn: psycopg.Connection, report: RetentionReport, cut: datetime | None) -> None:
    """Report rows whose local day is older than the cutoff's date."""
    table = "household_daily_report"
    t = report.table(table, cut)
    t.bytes_before = t.bytes_after = relation_bytes(conn, [table])
    if cut is None:
        return
    t.rows_removed = delete_in_batches(
        conn, table, sql.SQL("day < %s::date"), (cut.date(),), dry_run=report.dry_run
    )


# Alert history past the horizon: resolved episodes, their outbox rows first (foreign key), and
# silences that ended before the cutoff (open episodes and running silences always stay).
_OLD_ALERTS = sql.SQL("state = 'resolved' AND resolved_at < %s")
_ALERT_HISTORY: tuple[tuple[str, sql.Composable], ...] = (
    (
        "alert_outbox",
        sql.SQL("alert_id IN (SELECT alert_id FROM energy.alerts WHERE {})").format(_OLD_ALERTS),
    ),
    ("alerts", _OLD_ALERTS),
    ("alert_silences", sql.SQL("until < %s")),
)


def _alerts(conn: psycopg.Connection, report: RetentionReport, cut: datetime | None) -> None:
    """Resolved alert episodes older than the horizon with their outbox rows, and expired
    silences."""
    for table, condition in _ALERT_HISTORY:
        t = report.table(table, cut)
        t.bytes_before = t.bytes_after = relation_bytes(conn, [table])
        if cut is not None:
            t.rows_removed = delete_in_batches(
                conn, table, condition, (cut,), dry_run=report.dry_run
            )


def run_retention(
    conn: psycopg.Connection,
    table_horizons: Sequence[Horizon],
    lateness: timedelta,
    now: datetime,
    *,
    dry_run: bool = False,
    lock_timeout_ms: int = LOCK_TIMEOUT_MS,
) -> RetentionReport:
    """Remove (dry: only measure) everything past its horizon; keep partitions created ahead;
    last, vacuum the rollup tables' finished days that need it (dry: only list them).

    `conn` must be in autocommit mode (as `storage.connect` opens it). Idempotent: a second run
    at the same `now` removes nothing, and vacuums only what was written since.
    """
    report = RetentionReport(now=now, dry_run=dry_run)
    cuts = {h.table: cutoff(now, h.days, lateness) for h in table_horizons}
    for h in table_horizons:
        if h.table in PARTITIONED_TABLES:
            _partitioned_table(conn, report, h, cuts[h.table], lock_timeout_ms)
    if "quarantine" in cuts:
        _quarantine(conn, report, cuts["quarantine"])
    if "household_daily_report" in cuts:
        _daily_reports(conn, report, cuts["household_daily_report"])
    if "alerts" in cuts:
        _alerts(conn, report, cuts["alerts"])
    if not dry_run:
        _finish(conn, report)
    vacuum_finished_days(conn, report, lateness, lock_timeout_ms=lock_timeout_ms)
    return report


def _finish(conn: psycopg.Connection, report: RetentionReport) -> None:
    """Vacuum what lost rows, measure sizes after, create the partitions ahead."""
    row_tables = [
        t.table for t in report.tables.values() if t.rows_removed and not t.partitions_dropped
    ]
    _vacuum(conn, row_tables)
    for name in row_tables:
        report.tables[name].bytes_after = relation_bytes(conn, [name])
    today = report.now.astimezone(UTC).date()
    for table in PARTITIONED_TABLES:
        report.partitions_created += create_partitions(
            conn, table, today, today + timedelta(days=PARTITION_DAYS_AHEAD)
        )


def vacuum_finished_days(
    conn: psycopg.Connection,
    report: RetentionReport,
    lateness: timedelta,
    *,
    lock_timeout_ms: int = LOCK_TIMEOUT_MS,
) -> None:
    """`VACUUM (ANALYZE)` the rollup tables' day partitions of `vacuum_days` that need it
    (`PartitionVacuum.needed`), adding each to `report.vacuums`; a dry run only adds them.

    Autovacuum runs on a rollup partition once a thousand rows have arrived since its last run
    (migration 0011), so a finished day keeps its last rows outside the visibility map, and every
    index-only read of them visits the heap, until something vacuums it. A partition that cannot
    be vacuumed (a lock not granted in time, not the owner) gets an error in the report and the
    others go on: everything else retention does is already done by then.
    """
    days = set(vacuum_days(report.now, lateness))
    due: list[PartitionVacuum] = []
    for table in PARTITIONED_TABLES:
        parts = [p for p in day_partitions(conn, table) if p.attached and p.day in days]
        due += [v for v in partition_visibility(conn, parts) if v.needed]
    report.vacuums += due
    if report.dry_run or not due:
        return
    if not conn.autocommit:
        for v in due:
            v.error = "not vacuumed: VACUUM needs an autocommit connection (storage.connect)"
        return
    _set_lock_timeout(conn, lock_timeout_ms)
    for v in due:
        if not v.owned:
            v.error = (
                "not vacuumed: only its owner can vacuum it (connect as a member of energy_owner)"
            )
            continue
        _vacuum_partition(conn, v, lock_timeout_ms)


def _vacuum_partition(conn: psycopg.Connection, v: PartitionVacuum, lock_timeout_ms: int) -> None:
    """Vacuum one partition and read back its pages; a failure is kept as `v.error`."""
    try:
        conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(_ident("energy", v.name)))
    except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled) as exc:
        v.error = (
            f"not vacuumed: a lock was not granted within {lock_timeout_ms} ms (a vacuum, "
            f"analyze or DDL holds it); the next run tries again ({type(exc).__name__})"
        )
        return
    except psycopg.Error as exc:
        if conn.broken:
            raise
        v.error = f"not vacuumed: {type(exc).__name__}: {exc.diag.message_primary or exc}"
        return
    v.vacuumed = True
    [after] = partition_visibility(conn, [DayPartition(v.table, v.day, True, False)])
    v.pages_after, v.visible_pages_after = after.pages, after.visible_pages


def run_retention_for(
    conn: psycopg.Connection,
    settings: Settings,
    now: datetime,
    *,
    dry_run: bool = False,
    lock_timeout_ms: int = LOCK_TIMEOUT_MS,
) -> RetentionReport:
    """`run_retention` with the horizons and lateness window of `settings`."""
    lateness = timedelta(seconds=settings.lateness_seconds)
    return run_retention(
        conn, horizons(settings), lateness, now, dry_run=dry_run, lock_timeout_ms=lock_timeout_ms
    )
