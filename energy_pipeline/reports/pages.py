"""What the rendered reports show, read from PostgreSQL: a household's day with its hourly load
against its trailing week, and the fleet's day. No Dagster here, no HTML here (render.py)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg

from energy_pipeline.reports.compute import (
    TRAILING_DAYS,
    compute_reports,
    stored_day,
    stored_report,
)

HOUR = timedelta(hours=1)
TOP_HOUSEHOLDS = 10
# Below this share of its minutes a household's day is listed under data quality.
INCOMPLETE_BELOW = 0.9

_HOURLY = """
SELECT floor(extract(epoch FROM bucket - %(start)s) / 3600)::integer AS slot,
       sum(energy_wh_sum ORDER BY bucket) / 1000.0
FROM energy.household_rollup_5m
WHERE household_id = %(household)s AND bucket >= %(start)s AND bucket < %(end)s
GROUP BY 1 ORDER BY 1
"""

_HISTORY_HOURLY = """
SELECT (bucket AT TIME ZONE %(tz)s)::date AS local_day,
       extract(hour FROM bucket AT TIME ZONE %(tz)s)::integer AS local_hour,
       sum(energy_wh_sum ORDER BY bucket) / 1000.0
FROM energy.household_rollup_5m
WHERE household_id = %(household)s AND bucket >= %(history_start)s AND bucket < %(start)s
GROUP BY 1, 2
"""

_FLEET_HOURLY = """
SELECT extract(hour FROM f.bucket AT TIME ZONE r.timezone)::integer AS local_hour,
       sum(f.energy_wh_sum ORDER BY f.household_id, f.bucket) / 1000.0
FROM energy.household_daily_report r
JOIN energy.household_rollup_5m f
  ON f.household_id = r.household_id AND f.bucket >= r.day_start AND f.bucket < r.day_end
WHERE r.day = %(day)s
GROUP BY 1 ORDER BY 1
"""


@dataclass(frozen=True)
class HourPoint:
    """One hour of a load curve: its label (local clock), kWh (None: no data) and reference."""

    label: str
    kwh: float | None
    reference_kwh: float | None = None


@dataclass(frozen=True)
class HouseholdPage:
    """A household's report row and its hourly load curve against its trailing-week average."""

    report: dict[str, Any]
    hours: list[HourPoint]
    stored: bool
    # Set when Python's tz database lacks the report's zone and the hours are shown in UTC.
    clock_note: str | None = None


@dataclass(frozen=True)
class FleetPage:
    """The fleet's day: every household's report row and the load by local clock hour."""

    day: date
    reports: list[dict[str, Any]]
    hours: list[HourPoint]
    top: list[dict[str, Any]] = field(default_factory=list)
    incomplete: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total_kwh(self) -> float:
        return sum(r["energy_kwh"] for r in self.reports)

    @property
    def with_data(self) -> int:
        return sum(1 for r in self.reports if r["minutes_covered"] > 0)

    @property
    def complete(self) -> int:
        return sum(1 for r in self.reports if r["minutes_covered"] >= r["minutes_expected"])

    @property
    def completeness(self) -> float | None:
        expected = sum(r["minutes_expected"] for r in self.reports)
        return sum(r["minutes_covered"] for r in self.reports) / expected if expected else None


def page_zone(zone: str) -> tuple[str, str | None]:
    """The zone a page's clock uses: `zone`, or UTC with a note saying so when Python's tz
    database does not know it (PostgreSQL's may, and then computed the report in it)."""
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        note = f"Time zone {zone} is unknown to this renderer: hours are shown in UTC."
        return "UTC", note
    return zone, None


def hour_labels(day_start: datetime, hours: int, zone: str) -> list[str]:
    """Local clock time of each hour slot from the local midnight (23, 24 or 25 of them)."""
    tz = ZoneInfo(zone)
    return [(day_start + i * HOUR).astimezone(tz).strftime("%H:%M") for i in range(hours)]


def trailing_hourly(rows: list[tuple[date, int, float]]) -> dict[int, float]:
    """Mean kWh per local clock hour over the history days holding data."""
    days = {d for d, _, _ in rows}
    per_hour: dict[int, float] = defaultdict(float)
    for _, hour, kwh in rows:
        per_hour[hour] += kwh
    return {h: v / len(days) for h, v in per_hour.items()}


def _hours(conn: psycopg.Connection, report: dict[str, Any], zone: str) -> list[HourPoint]:
    start, end = report["day_start"], report["day_end"]
    params = {
        "household": report["household_id"],
        "start": start,
        "end": end,
        "tz": zone,
        "history_start": datetime.combine(
            report["day"] - timedelta(days=TRAILING_DAYS), datetime.min.time(), ZoneInfo(zone)
        ).astimezone(UTC),
    }
    slots: dict[int, float] = dict(conn.execute(_HOURLY, params).fetchall())
    reference = trailing_hourly(conn.execute(_HISTORY_HOURLY, params).fetchall())
    count = round((end - start) / HOUR)
    labels = hour_labels(start, count, zone)
    return [
        HourPoint(label, slots.get(i), reference.get(int(label[:2])) if reference else None)
        for i, label in enumerate(labels)
    ]


def household_page(conn: psycopg.Connection, household_id: str, day: date) -> HouseholdPage | None:
    """The stored report of a household's day (computed now when none is stored), or None when
    the household has no registered device and no data around that day."""
    report = stored_report(conn, household_id, day)
    stored = report is not None
    if report is None:
        computed = compute_reports(conn, day, households=[household_id])
        if not computed:
            return None
        report = computed[0]
    zone, note = page_zone(report["timezone"])
    return HouseholdPage(report, _hours(conn, report, zone), stored, note)


def fleet_page(conn: psycopg.Connection, day: date) -> FleetPage:
    """The stored reports of `day` for the whole fleet."""
    reports = stored_day(conn, day)
    by_hour: dict[int, float] = dict(conn.execute(_FLEET_HOURLY, {"day": day}).fetchall())
    hours = [HourPoint(f"{h:02d}:00", by_hour.get(h)) for h in range(24)]
    top = sorted(reports, key=lambda r: (-r["energy_kwh"], r["household_id"]))[:TOP_HOUSEHOLDS]
    incomplete = sorted(
        (r for r in reports if r["minutes_covered"] < INCOMPLETE_BELOW * r["minutes_expected"]),
        key=lambda r: (r["minutes_covered"] / r["minutes_expected"], r["household_id"]),
    )
    return FleetPage(day, reports, hours, top, incomplete)
