"""Retention planning, pure: horizons and their validation, cutoffs, which day partitions
have expired or are finished and due a vacuum, and the report of a run. No database, no Dagster."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Protocol

from energy_pipeline.config import ConfigError
from energy_pipeline.storage import StorageError

DAY = timedelta(days=1)
PARTITIONED_TABLES = ("device_rollup_1m", "household_rollup_5m", "device_rollup_1h")
# Finished days of the rollup tables each run looks at for a vacuum: the last few, so a day a
# failed run missed is caught up, while a first run on an old database stays short.
VACUUM_DAYS = 3


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


class RetentionBounds(HorizonSettings, Protocol):
    """The horizons with the windows they may never reach into (`Settings` and the job's resource
    both have them)."""

    @property
    def lateness_seconds(self) -> int: ...
    @property
    def raw_retention_days(self) -> int: ...


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


def validate_horizons(settings: RetentionBounds) -> None:
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


def vacuum_days(now: datetime, lateness: timedelta, days: int = VACUUM_DAYS) -> list[date]:
    """The last `days` UTC days that ended before `now - lateness`, oldest first.

    Their rows are never recomputed again, so one vacuum leaves them all-visible for good. The
    current day, and any day still inside the lateness window, is never among them."""
    last = (now - lateness).astimezone(UTC).date() - DAY
    return [last - timedelta(days=n) for n in range(days - 1, -1, -1)]


@dataclass
class PartitionVacuum:
    """A finished day partition of a rollup table as the catalog saw it, and its vacuum."""

    table: str
    day: date
    rows_since_vacuum: int
    rows_since_analyze: int
    pages: int
    visible_pages: int
    owned: bool = True
    vacuumed: bool = False
    pages_after: int = 0
    visible_pages_after: int = 0
    error: str = ""

    @property
    def name(self) -> str:
        return f"{self.table}_p{self.day:%Y%m%d}"

    @property
    def needed(self) -> bool:
        """Rows written or changed since the last vacuum or analyze, or pages outside the
        visibility map (a vacuum that ran while those rows were not yet visible to every
        transaction could not mark them)."""
        return (
            self.rows_since_vacuum > 0
            or self.rows_since_analyze > 0
            or self.visible_pages < self.pages
        )

    def describe(self) -> str:
        after = (
            f", {self.visible_pages_after}/{self.pages_after} after this one"
            if self.vacuumed
            else ""
        )
        return (
            f"{self.name}: {self.rows_since_vacuum} rows inserted since its last vacuum, "
            f"{self.rows_since_analyze} changed since its last analyze; all-visible pages "
            f"{self.visible_pages}/{self.pages} at its last vacuum or analyze{after}"
        )


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
    # Finished day partitions due a vacuum; a dry run only lists them.
    vacuums: list[PartitionVacuum] = field(default_factory=list)

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

    @property
    def partitions_vacuumed(self) -> int:
        return sum(v.vacuumed for v in self.vacuums)

    @property
    def vacuum_warnings(self) -> list[str]:
        return [f"energy.{v.name} {v.error}" for v in self.vacuums if v.error]


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
    done = report.vacuums if report.dry_run else [v for v in report.vacuums if v.vacuumed]
    lines.append(
        f"{'would vacuum' if report.dry_run else 'vacuumed'} (ANALYZE): {len(done)} finished day "
        "partitions"
    )
    lines += [f"  {v.describe()}" for v in done]
    lines += [f"warning: {w}" for w in report.vacuum_warnings]
    return "\n".join(lines)
