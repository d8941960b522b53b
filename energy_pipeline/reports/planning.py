"""Which report days to compute when: the pure planner behind the report sensor, and the ledger
query it reads. No Dagster here.

A day D is due once the last zone's local day D has closed (UTC-12: D+1 12:00 UTC) plus a settle
time. It is computed again whenever a 5-minute window it read (every zone's local day D, from
UTC+14's start to UTC-12's end, or the trailing week before it) was recomputed since:
`report_days.source_computed_at` then differs from the windows' newest `computed_at`. Windows
after D+1 12:00 UTC are not read, so new live windows do not make D stale.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

import psycopg

from energy_pipeline.reports.compute import SPAN_AFTER, SPAN_BEFORE, TRAILING_DAYS

# The last local day D to close is UTC-12's, at D+1 12:00 UTC: the end of what the day reads.
LAST_ZONE_CLOSES = SPAN_AFTER

_STATE = """
SELECT d::date,
       (SELECT max(w.computed_at) FROM energy.rollup_windows w
        WHERE w.grain = 'household_rollup_5m'
          AND w.bucket >= d - %(before)s AND w.bucket < d + %(after)s),
       r.day IS NOT NULL, r.source_computed_at
FROM generate_series(%(first)s::date, %(last)s::date, interval '1 day') AS d
LEFT JOIN energy.report_days r ON r.day = d::date
ORDER BY 1
"""


@dataclass(frozen=True)
class ReportDayState:
    """A report day: the newest computed_at of the windows it reads now, and what it last read."""

    day: date
    source_computed_at: datetime | None
    recorded: bool
    recorded_source_computed_at: datetime | None

    @property
    def stale(self) -> bool:
        return not self.recorded or self.recorded_source_computed_at != self.source_computed_at


@dataclass(frozen=True)
class DayRun:
    """A run of the report asset for `day`: when it was created and, if it failed, ended."""

    day: date
    created: datetime
    ended: datetime | None = None


@dataclass(frozen=True)
class DayRequest:
    day: date
    run_key: str


def due_at(day: date, settle: timedelta) -> datetime:
    """When day `day` has closed in every zone, plus `settle`."""
    return datetime.combine(day, time(0), UTC) + LAST_ZONE_CLOSES + settle


def report_day_states(conn: psycopg.Connection, first: date, last: date) -> list[ReportDayState]:
    """Every day first..last with its source stamp now and its recorded one (one query)."""
    params = {
        "first": first,
        "last": last,
        "before": SPAN_BEFORE + timedelta(days=TRAILING_DAYS),
        "after": SPAN_AFTER,
    }
    return [ReportDayState(*row) for row in conn.execute(_STATE, params).fetchall()]


def plan_report_days(
    states: list[ReportDayState],
    in_flight: list[DayRun],
    failed: list[DayRun],
    now: datetime,
    settle: timedelta,
    retry_backoff: timedelta = timedelta(minutes=5),
    max_requests: int = 7,
) -> list[DayRequest]:
    """The report days to request on one tick, newest first.

    A day is requested when it is due, has data (some 5-minute window in its span), is stale,
    and no run of it is in flight. After a failed run it waits `retry_backoff`, then gets a key
    naming the failure (Dagster skips a reused run key even when that run failed). Keys are
    stable per (day, source stamp): a day is computed again exactly when its inputs change.
    """
    busy = {r.day for r in in_flight}
    requests = []
    for s in sorted(states, key=lambda s: s.day, reverse=True):
        if s.source_computed_at is None or not s.stale or s.day in busy:
            continue
        if now < due_at(s.day, settle):
            continue
        stamp = s.source_computed_at
        ends = [r.ended for r in failed if r.day == s.day and r.created >= stamp and r.ended]
        suffix = ""
        if ends:
            if now - max(ends) < retry_backoff:
                continue
            suffix = f":retry-{int(max(ends).timestamp())}"
        key = f"household_daily_report:{s.day.isoformat()}:{int(stamp.timestamp() * 1e6)}{suffix}"
        requests.append(DayRequest(s.day, key))
    return requests[:max_requests]
