"""What the minute sensor asks for on a tick: new minutes and repairs of ledger holes (no Dagster).

A *hole* is a range of minutes, at or after the first minute the sensor ever requested and inside
the raw-data retention, that has no row in the ledger (`energy.rollup_minutes`) and is not covered
by a live run. Holes come from failed runs, runs lost in a crash, and outages of any length.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from energy_pipeline.scheduling import (
    MINUTE,
    contiguous_ranges,
    floor_minute,
    new_minutes,
    newest_due_minute,
)

Range = tuple[datetime, datetime]
"""Inclusive (first, last) minute starts."""

# The ledger is scanned for holes at most this often (about 30 ms over 30 days), and a hole whose
# repair failed is requested again at most this often, so an outage is not a storm of failing runs.
REPAIR_BACKOFF = timedelta(seconds=60)
# At most this many repair runs are queued or running at once: a 30-day hole (720 runs of 60
# minutes) is worked off newest first, a few runs at a time, never launched all at once.
REPAIR_RUNS_IN_FLIGHT = 4
# Statuses of a run that has been created but has not finished.
WAITING, STARTING, STARTED, QUEUED = "NOT_STARTED", "STARTING", "STARTED", "QUEUED"


@dataclass(frozen=True)
class PlanSettings:
    """The knobs the planner needs, from `MinuteSensorSettings` and the partitions definition."""

    earliest: datetime
    settle_seconds: int
    max_range_minutes: int
    raw_retention_days: int
    run_timeout_seconds: int
    repair_runs_in_flight: int = REPAIR_RUNS_IN_FLIGHT
    repair_backoff: timedelta = REPAIR_BACKOFF


@dataclass(frozen=True)
class Cursor:
    """What the sensor remembers between ticks."""

    last: datetime | None = None
    since: datetime | None = None
    repair_after: float = 0.0
    hole_minutes: int = 0


@dataclass(frozen=True)
class RunInFlight:
    """A rollup run that has not finished: its origin, status, minutes and when it got there.

    `since` is when it was created (not started, queued, starting) or started (started).
    """

    origin: str
    status: str
    first: datetime
    last: datetime
    since: datetime


@dataclass(frozen=True)
class MinutePlan:
    """The requests of one tick, the holes found, and the cursor to store."""

    fresh: list[Range]
    repairs: list[Range]
    holes: list[Range] | None
    cursor: Cursor
    orphans: list[RunInFlight] = field(default_factory=list)

    @property
    def hole_minutes(self) -> int:
        return range_minutes(self.holes or [])

    @property
    def deferred_minutes(self) -> int:
        """Hole minutes left for later ticks."""
        return self.hole_minutes - range_minutes(self.repairs)


def range_minutes(ranges: Iterable[Range]) -> int:
    """Number of minutes in inclusive ranges."""
    return sum((last - first) // MINUTE + 1 for first, last in ranges)


def is_orphan(run: RunInFlight, now: datetime, run_timeout_seconds: int) -> bool:
    """Whether a run that has not finished has been at it longer than any live run can be.

    Queued runs wait for a slot and are never orphans. A run created, starting or started more than
    `run_timeout_seconds` ago lost its process (run monitoring fails it at about that age): its
    minutes must not wait for it.
    """
    if run.status == QUEUED:
        return False
    return now - run.since > timedelta(seconds=run_timeout_seconds)


def repair_window(cursor: Cursor, now: datetime, settings: PlanSettings) -> Range | None:
    """The minutes to scan for holes on this tick, or None when no scan is due.

    From the latest of the first partition, the first minute the sensor requested (older history
    is a backfill, not a repair) and the start of raw-data retention (older raw points may be gone,
    and a repair would store an empty minute as complete), to the last minute already requested.
    """
    if cursor.last is None or now.timestamp() < cursor.repair_after:
        return None
    retained = floor_minute(now - timedelta(days=settings.raw_retention_days)) + MINUTE
    first = max(settings.earliest, cursor.since or settings.earliest, retained)
    return (first, cursor.last) if first <= cursor.last else None


def ledger_gaps(ledger_minutes: Iterable[datetime], first: datetime, last: datetime) -> list[Range]:
    """Ranges of minutes in first..last without a ledger row, newest first."""
    done = sorted({m for m in ledger_minutes if first <= m <= last})
    gaps, start = [], first
    for m in [*done, last + MINUTE]:
        if m > start:
            gaps.append((start, m - MINUTE))
        start = m + MINUTE
    return gaps[::-1]


def subtract(ranges: Iterable[Range], busy: Iterable[Range]) -> list[Range]:
    """The parts of `ranges` not covered by `busy`, newest first."""
    out: list[Range] = []
    cuts = sorted(busy)
    for first, last in ranges:
        pieces = [(first, last)]
        for b_first, b_last in cuts:
            pieces = [
                piece
                for p_first, p_last in pieces
                for piece in (
                    (p_first, min(p_last, b_first - MINUTE)),
                    (max(p_first, b_last + MINUTE), p_last),
                )
                if piece[0] <= piece[1]
            ]
        out.extend(pieces)
    return sorted(out, reverse=True)


def newest_first_runs(holes: Sequence[Range], max_len: int, limit: int) -> list[Range]:
    """Up to `limit` runs of at most `max_len` minutes, cut from the newest end of the holes."""
    runs: list[Range] = []
    for first, last in sorted(holes, reverse=True):
        end = last
        while end >= first and len(runs) < limit:
            start = max(first, end - (max_len - 1) * MINUTE)
            runs.append((start, end))
            end = start - MINUTE
    return runs


def plan_minutes(
    cursor: Cursor,
    ledger_holes: Sequence[Range] | None,
    runs_in_flight: Sequence[RunInFlight],
    now: datetime,
    settings: PlanSettings,
) -> MinutePlan:
    """Requests for one tick of the minute sensor.

    Args:
        cursor: what the previous tick stored.
        ledger_holes: minutes of `repair_window(cursor, now, settings)` without a ledger row, as
            ranges (see `ledger_gaps`); None when no scan was due this tick.
        runs_in_flight: rollup runs (of any origin) that have not finished.
        now: the clock.
        settings: pacing and bounds.

    Returns:
        New minutes as ranged runs, repair runs (newest holes first, capped so that at most
        `repair_runs_in_flight` repair runs are queued or running), every hole that is not in
        flight (for reporting), orphaned runs, and the next cursor.
    """
    newest = newest_due_minute(now, settings.settle_seconds)
    fresh = new_minutes(cursor.last, newest, settings.earliest)
    live = [r for r in runs_in_flight if not is_orphan(r, now, settings.run_timeout_seconds)]
    orphans = [r for r in runs_in_flight if r not in live]
    holes: list[Range] | None = None
    repairs: list[Range] = []
    repair_after = cursor.repair_after
    hole_minutes = cursor.hole_minutes
    if ledger_holes is not None:
        holes = subtract(ledger_holes, [(r.first, r.last) for r in live])
        budget = settings.repair_runs_in_flight - sum(r.origin == "repair" for r in live)
        repairs = newest_first_runs(holes, settings.max_range_minutes, max(budget, 0))
        repair_after = (now + settings.repair_backoff).timestamp()
        hole_minutes = range_minutes(holes)
    since = cursor.since or (fresh[0] if fresh else newest)
    return MinutePlan(
        fresh=contiguous_ranges(fresh, settings.max_range_minutes),
        repairs=repairs,
        holes=holes,
        cursor=Cursor(
            last=max(newest, cursor.last) if cursor.last else newest,
            since=since,
            repair_after=repair_after,
            hole_minutes=hole_minutes,
        ),
        orphans=orphans,
    )


def describe_ranges(ranges: Sequence[Range], fmt: str = "%Y-%m-%d %H:%M", limit: int = 20) -> str:
    """Ranges as text for a log line, e.g. `2026-11-24 10:00..10:59 (60 min)`; long lists cut."""
    parts = []
    for first, last in ranges[:limit]:
        n = range_minutes([(first, last)])
        end = last.strftime("%H:%M" if last.date() == first.date() else fmt)
        parts.append(f"{first.strftime(fmt)}" + (f"..{end}" if n > 1 else "") + f" ({n} min)")
    if len(ranges) > limit:
        parts.append(f"and {len(ranges) - limit} more")
    return ", ".join(parts)


@dataclass(frozen=True)
class LateCheck:
    """Which minutes one tick of the late-data sensor compares, and the cursor to store."""

    start: datetime
    end: datetime
    full_scan: bool
    full_scan_at: float


def plan_late_check(
    full_scan_at: float,
    now: datetime,
    earliest: datetime,
    settle_seconds: int,
    lateness_seconds: int,
    audit_extra_seconds: int,
    recent_seconds: int,
    full_scan_seconds: int,
) -> LateCheck | None:
    """The window to compare: recent minutes every tick, the whole lateness window plus the
    audit margin every `full_scan_seconds`; None when no minute is due yet."""
    full_scan = now.timestamp() - full_scan_at >= full_scan_seconds
    reach = (
        lateness_seconds + audit_extra_seconds
        if full_scan
        else min(recent_seconds, lateness_seconds)
    )
    start = floor_minute(max(earliest, now - timedelta(seconds=reach)))
    end = newest_due_minute(now, settle_seconds) + MINUTE
    if end <= start:
        return None
    return LateCheck(start, end, full_scan, now.timestamp() if full_scan else full_scan_at)


def split_late(
    late: Sequence[tuple[datetime, int, int]],
    now: datetime,
    lateness_seconds: int,
    busy: Iterable[datetime],
) -> tuple[list[datetime], list[tuple[datetime, int]]]:
    """Minutes whose checksums changed, as (bucket, extra points, points already recorded):
    those to recompute (inside the lateness window) and those only to record as ignored (past it,
    with a count not yet recorded). A minute a live run covers is neither: that run reads the
    late points (a backfill of old minutes covers minutes past the window too)."""
    cutoff = now - timedelta(seconds=lateness_seconds)
    in_flight = set(busy)
    due = [b for b, _, _ in late if b >= cutoff and b not in in_flight]
    ignored = [
        (b, n) for b, n, recorded in late if b < cutoff and n != recorded and b not in in_flight
    ]
    return due, ignored
