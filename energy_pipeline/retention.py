"""Retention of the `energy` schema: which data is past its horizon, and removing it.

Day-partitioned tables lose whole day partitions (DETACH CONCURRENTLY, then DROP, with their ledger
rows in the same transaction as the DROP); smaller tables lose rows in batches. Nothing newer than
the lateness window is ever removed, whatever the horizon says. No Dagster here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Protocol

import psycopg
from psycopg import sql

from energy_pipeline.config import ConfigError
from energy_pipeline.storage import StorageError, create_partitions

if TYPE_CHECKING:
    from energy_pipeline.config import Settings

DAY = timedelta(days=1)
PARTITIONED_TABLES = ("device_rollup_1m", "household_rollup_5m", "device_rollup_1h")
# Day partitions kept created ahead of today by every retention run.
PARTITION_DAYS_AHEAD = 7
# A DDL or DELETE waits this long for a lock before giving up with a RetentionError: a reader's
# long transaction makes retention fail (and run again next time) instead of queueing readers.
LOCK_TIMEOUT_MS = 5000
DELETE_BATCH_ROWS = 10_000
_PARTITION_NAME = re.compile(r"^(?P<table>[a-z0-9_]+)_p(?P<day>\d{8})$")


class RetentionError(StorageError):
    """Retention could not finish; what it removed until then stays removed and consistent."""


@dataclass(frozen=True)
class Horizon:
    """How long one table keeps its data: `days` (0 keeps it forever), from the setting `env`."""

    table: str
    days: int
    env: str
    # Bounded by the minute partition window as well as by the lateness window.
    covers_minute_window: bool = False


class HorizonSettings(Protocol):
    """The horizon fields of `config.Settings` (and of the retention job's settings resource)."""

    @property
    def retention_device_rollup_1m_days(self) -> int: ...
    @property
    def retention_household_rollup_5m_days(self) -> int: ...
    @property
    def retention_device_rollup_1h_days(self) -> int: ...
    @property
    def retention_daily_report_days(self) -> int: ...
    @property
    def retention_quarantine_days(self) -> int: ...
    @property
    def retention_alerts_days(self) -> int: ...


def horizons(settings: HorizonSettings) -> tuple[Horizon, ...]:
    """Every table's horizon, from the settings."""
    s = settings
    return (
        Horizon(
            "device_rollup_1m",
            s.retention_device_rollup_1m_days,
            "ENERGY_RETENTION_DEVICE_ROLLUP_1M_DAYS",
            True,
        ),
        Horizon(
            "household_rollup_5m",
            s.retention_household_rollup_5m_days,
            "ENERGY_RETENTION_HOUSEHOLD_ROLLUP_5M_DAYS",
            True,
        ),
        Horizon(
            "device_rollup_1h",
            s.retention_device_rollup_1h_days,
            "ENERGY_RETENTION_DEVICE_ROLLUP_1H_DAYS",
            True,
        ),
        Horizon(
            "household_daily_report",
            s.retention_daily_report_days,
            "ENERGY_RETENTION_DAILY_REPORT_DAYS",
        ),
        Horizon("quarantine", s.retention_quarantine_days, "ENERGY_RETENTION_QUARANTINE_DAYS"),
        Horizon("alerts", s.retention_alerts_days, "ENERGY_RETENTION_ALERTS_DAYS"),
    )


def minute_window_days(raw_retention_days: int) -> int:
    """Days the oldest minute partition can reach back: it starts at the UTC midnight
    `raw_retention_days` before now (scheduling.partitions_start), so up to one more day."""
    return raw_retention_days + 1


def validate_horizons(settings: Settings) -> None:
    """Refuse horizons that would remove data the pipeline may still recompute.

    Every horizon (and the raw-data retention) must be longer than the lateness window; the rollup
    tables' horizons must also cover the minute partition window, so no existing minute partition
    loses its rows.
    """
    lateness = timedelta(seconds=settings.lateness_seconds)
    if timedelta(days=settings.raw_retention_days) <= lateness:
        raise ConfigError(
            f"ENERGY_RAW_RETENTION_DAYS ({settings.raw_retention_days}) must be longer than the "
            f"lateness window (ENERGY_LATENESS_SECONDS={settings.lateness_seconds})"
        )
    window = minute_window_days(settings.raw_retention_days)
    for h in horizons(settings):
        if h.days == 0:
            continue
        if timedelta(days=h.days) <= lateness:
            raise ConfigError(
                f"{h.env} ({h.days} days) must be longer than the lateness window "
                f"(ENERGY_LATENESS_SECONDS={settings.lateness_seconds}), or 0 to keep forever"
            )
        if h.covers_minute_window and h.days < window:
            raise ConfigError(
                f"{h.env} ({h.days} days) must be at least the minute partition window "
                f"({window} days: ENERGY_RAW_RETENTION_DAYS + 1), or 0 to keep forever"
            )


# --- Planning (pure) ----------------------------------------------------------------------------


def cutoff(now: datetime, days: int, lateness: timedelta) -> datetime | None:
    """Data older than this goes (None: kept forever); never later than now - lateness."""
    if days == 0:
        return None
    return min(now - timedelta(days=days), now - lateness)


def day_start(day: date) -> datetime:
    return datetime.combine(day, time(), UTC)


def expired_days(days: Iterable[date], cut: datetime | None) -> list[date]:
    """Day partitions lying wholly before `cut`, oldest first."""
    if cut is None:
        return []
    return sorted(d for d in set(days) if day_start(d) + DAY <= cut)


@dataclass
class TableReport:
    """What retention removed (or, dry, would remove) from one table."""

    table: str
    partitions_dropped: list[date] = field(default_factory=list)
    rows_removed: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    cutoff: datetime | None = None
    note: str = ""

    @property
    def bytes_freed(self) -> int:
        return max(self.bytes_before - self.bytes_after, 0)


@dataclass
class RetentionReport:
    """One retention run, table by table."""

    now: datetime
    dry_run: bool
    tables: dict[str, TableReport] = field(default_factory=dict)
    partitions_created: int = 0

    def table(self, name: str, cut: datetime | None = None) -> TableReport:
        return self.tables.setdefault(name, TableReport(name, cutoff=cut))

    @property
    def partitions_dropped(self) -> int:
        return sum(len(t.partitions_dropped) for t in self.tables.values())

    @property
    def rows_removed(self) -> int:
        return sum(t.rows_removed for t in self.tables.values())

    @property
    def bytes_freed(self) -> int:
        return sum(t.bytes_freed for t in self.tables.values())


def format_report(report: RetentionReport) -> str:
    """The report as a fixed-width table, as the command line prints it."""
    verb = "would remove" if report.dry_run else "removed"
    mode = "dry run: nothing changed" if report.dry_run else "applied"
    lines = [
        f"retention at {report.now:%Y-%m-%d %H:%M:%S} UTC ({mode})",
        f"{'table':<24} {'cutoff':<17} {'partitions':>10} {'rows':>10} {'MB before':>10} "
        f"{'MB after':>10}  note",
    ]
    for t in report.tables.values():
        cut = f"{t.cutoff:%Y-%m-%d %H:%M}" if t.cutoff else "kept forever"
        lines.append(
            f"{t.table:<24} {cut:<17} {len(t.partitions_dropped):>10} {t.rows_removed:>10} "
            f"{t.bytes_before / 1e6:>10.2f} {t.bytes_after / 1e6:>10.2f}  {t.note}".rstrip()
        )
    lines.append(
        f"{verb}: {report.partitions_dropped} partitions, {report.rows_removed} rows, "
        f"{report.bytes_freed / 1e6:.2f} MB; partitions created ahead: {report.partitions_created}"
    )
    return "\n".join(lines)


# --- Catalog ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DayPartition:
    """A table named `<parent>_pYYYYMMDD`: attached, half-detached, or left detached."""

    parent: str
    day: date
    attached: bool
    detach_pending: bool

    @property
    def name(self) -> str:
        return f"{self.parent}_p{self.day:%Y%m%d}"


_DAY_PARTITIONS = """
SELECT c.relname, i.inhrelid IS NOT NULL, coalesce(i.inhdetachpending, false)
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_inherits i ON i.inhrelid = c.oid
WHERE n.nspname = 'energy' AND c.relkind = 'r' AND c.relname ~ %s
"""


def day_partitions(conn: psycopg.Connection, table: str) -> list[DayPartition]:
    """Every day table of `energy.<table>`, detached leftovers of an interrupted run included."""
    rows = conn.execute(_DAY_PARTITIONS, (f"^{table}_p[0-9]{{8}}$",)).fetchall()
    out = []
    for name, attached, pending in rows:
        m = _PARTITION_NAME.match(name)
        if m:
            day = datetime.strptime(m["day"], "%Y%m%d").date()
            out.append(DayPartition(table, day, attached, pending))
    return sorted(out, key=lambda p: p.day)


def relation_bytes(conn: psycopg.Connection, names: Sequence[str]) -> int:
    """pg_total_relation_size summed over `energy.<name>` (absent ones count 0)."""
    row = conn.execute(
        "SELECT coalesce(sum(pg_total_relation_size(to_regclass('energy.' || quote_ident(n)))),"
        " 0)::bigint FROM unnest(%s::text[]) AS n",
        (list(names),),
    ).fetchone()
    return int(row[0]) if row else 0


def table_exists(conn: psycopg.Connection, table: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"energy.{table}",)).fetchone()
    return bool(row and row[0])


def columns(conn: psycopg.Connection, table: str) -> set[str]:
    rows = conn.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = 'energy' AND table_name = %s",
        (table,),
    ).fetchall()
    return {r[0] for r in rows}


def _check_owner(conn: psycopg.Connection, table: str) -> None:
    row = conn.execute(
        "SELECT pg_has_role(current_user, relowner, 'USAGE') FROM pg_class "
        "WHERE oid = %s::regclass",
        (f"energy.{table}",),
    ).fetchone()
    if not (row and row[0]):
        raise RetentionError(
            f"dropping partitions of energy.{table} needs its owner's rights: connect as a "
            "login that is a member of energy_owner (see docs/retention.md)"
        )


# --- Executing ----------------------------------------------------------------------------------


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
    _check_owner(conn, h.table)
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
    table = "household_daily_report"
    t = report.table(table, cut)
    if not table_exists(conn, table):
        t.note = "skipped: table not present yet"
        return
    t.bytes_before = t.bytes_after = relation_bytes(conn, [table])
    if cut is None:
        return
    if not {"household_id", "day"} <= columns(conn, table):
        t.note = "skipped: no (household_id, day) columns"
        return
    t.rows_removed = delete_in_batches(
        conn, table, sql.SQL("day < %s::date"), (cut.date(),), dry_run=report.dry_run
    )


_FOREIGN_KEY = """
SELECT array_agg(a.attname ORDER BY k.n), array_agg(b.attname ORDER BY k.n)
FROM pg_constraint c
CROSS JOIN LATERAL unnest(c.conkey, c.confkey) WITH ORDINALITY AS k(src, dst, n)
JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.src
JOIN pg_attribute b ON b.attrelid = c.confrelid AND b.attnum = k.dst
WHERE c.contype = 'f' AND c.conrelid = 'energy.alert_outbox'::regclass
  AND c.confrelid = 'energy.alerts'::regclass
GROUP BY c.oid
LIMIT 1
"""


def _alerts(conn: psycopg.Connection, report: RetentionReport, cut: datetime | None) -> None:
    """Resolved alert episodes older than the horizon, and their outbox rows first."""
    t = report.table("alerts", cut)
    if not table_exists(conn, "alerts"):
        t.note = "skipped: table not present yet (alerts migration not applied)"
        return
    t.bytes_before = t.bytes_after = relation_bytes(conn, ["alerts"])
    if cut is None:
        return
    if not {"state", "resolved_at"} <= columns(conn, "alerts"):
        t.note = "skipped: no state/resolved_at columns"
        return
    old = sql.SQL("state = 'resolved' AND resolved_at < %s")
    if table_exists(conn, "alert_outbox"):
        fk = conn.execute(_FOREIGN_KEY).fetchone()
        if not fk:
            t.note = "skipped: alert_outbox has no foreign key to alerts"
            return
        src, dst = fk
        o = report.table("alert_outbox", cut)
        o.bytes_before = o.bytes_after = relation_bytes(conn, ["alert_outbox"])
        match = sql.SQL("({}) IN (SELECT {} FROM energy.alerts WHERE {})").format(
            sql.SQL(", ").join(map(_ident, src)), sql.SQL(", ").join(map(_ident, dst)), old
        )
        o.rows_removed = delete_in_batches(
            conn, "alert_outbox", match, (cut,), dry_run=report.dry_run
        )
    t.rows_removed = delete_in_batches(conn, "alerts", old, (cut,), dry_run=report.dry_run)


def run_retention(
    conn: psycopg.Connection,
    table_horizons: Sequence[Horizon],
    lateness: timedelta,
    now: datetime,
    *,
    dry_run: bool = False,
    lock_timeout_ms: int = LOCK_TIMEOUT_MS,
) -> RetentionReport:
    """Remove (dry: only measure) everything past its horizon; keep partitions created ahead.

    `conn` must be in autocommit mode (as `storage.connect` opens it). Idempotent: a second run
    at the same `now` removes nothing.
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
