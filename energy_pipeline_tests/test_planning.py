"""The minute sensors' planners without servers: new minutes, repair horizon, caps and orphans;
the late-data sensor's window and its split into minutes to recompute and points to record."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from energy_pipeline.planning import (
    QUEUED,
    STARTED,
    STARTING,
    WAITING,
    Cursor,
    LateCheck,
    PlanSettings,
    RunInFlight,
    describe_ranges,
    is_orphan,
    ledger_gaps,
    newest_first_runs,
    plan_late_check,
    plan_minutes,
    range_minutes,
    repair_window,
    split_late,
    subtract,
)
from energy_pipeline.scheduling import MINUTE, minutes_between

NOW = datetime(2026, 11, 24, 13, 37, 15, tzinfo=UTC)
NEWEST = datetime(2026, 11, 24, 13, 36, tzinfo=UTC)  # newest closed minute at NOW, settle 0
EARLIEST = datetime(2026, 10, 25, tzinfo=UTC)  # partition start, 30 retention days
SETTINGS = PlanSettings(
    earliest=EARLIEST,
    settle_seconds=0,
    max_range_minutes=60,
    raw_retention_days=30,
    run_timeout_seconds=900,
)


def _plan(cursor, ledger_minutes=None, runs=(), now=NOW, settings=SETTINGS):
    """Plan a tick the way the sensor does, with the ledger given as the minutes that have rows."""
    window = repair_window(cursor, now, settings)
    holes = None if window is None else ledger_gaps(ledger_minutes or [], *window)
    return plan_minutes(cursor, holes, list(runs), now, settings)


def _run(first, last, status=STARTED, age=timedelta(seconds=10), origin="repair"):
    return RunInFlight(origin=origin, status=status, first=first, last=last, since=NOW - age)


def test_first_tick_requests_only_the_newest_minute_and_scans_nothing():
    plan = _plan(Cursor())
    assert plan.fresh == [(NEWEST, NEWEST)]
    assert plan.repairs == [] and plan.holes is None
    assert plan.cursor.last == plan.cursor.since == NEWEST


@pytest.mark.parametrize(
    ("outage", "max_range", "expected_runs"),
    [(timedelta(minutes=30), 60, 1), (timedelta(minutes=30), 7, 5), (timedelta(hours=5), 60, 5)],
)
def test_catch_up_after_downtime_is_ranged_without_gap_or_overlap(outage, max_range, expected_runs):
    last = NEWEST - outage
    settings = PlanSettings(**{**SETTINGS.__dict__, "max_range_minutes": max_range})
    plan = _plan(Cursor(last=last, since=last, repair_after=1e12), settings=settings)
    covered = [m for first, end in plan.fresh for m in minutes_between(first, end)]
    assert covered == minutes_between(last + MINUTE, NEWEST)
    assert len(plan.fresh) == expected_runs
    assert all(range_minutes([r]) <= max_range for r in plan.fresh)


@pytest.mark.parametrize(
    ("hole_age", "repaired"),
    [
        (timedelta(minutes=10), True),
        # Older than the 2-hour lateness window: repaired too (was never repaired before).
        (timedelta(hours=3), True),
        (timedelta(days=29, hours=23), True),
        # Before the raw-data retention: its points may be gone, so it is not repaired.
        (timedelta(days=30, minutes=5), False),
    ],
)
def test_a_minute_without_a_ledger_row_is_repaired_back_to_retention(hole_age, repaired):
    hole = NEWEST - hole_age
    last = NEWEST - MINUTE
    since = EARLIEST
    ledger = [m for m in minutes_between(EARLIEST, last) if m != hole]
    plan = _plan(Cursor(last=last, since=since), ledger)
    assert plan.fresh == [(NEWEST, NEWEST)]
    assert plan.repairs == ([(hole, hole)] if repaired else [])


def test_repairs_never_reach_before_the_first_requested_minute():
    since = NEWEST - timedelta(hours=5)
    last = NEWEST - MINUTE
    # Nothing at all in the ledger: history before `since` is a backfill, not a repair.
    plan = _plan(Cursor(last=last, since=since), [])
    assert plan.holes == [(since, last)]
    assert min(first for first, _ in plan.repairs) >= since


def test_thirty_day_hole_is_repaired_newest_first_a_few_runs_at_a_time():
    last = NEWEST - MINUTE
    plan = _plan(Cursor(last=last, since=EARLIEST), [])
    retained = NOW.replace(second=0) - timedelta(days=30) + MINUTE
    assert plan.holes == [(retained, last)]
    assert plan.hole_minutes == 30 * 1440 - 2  # 30 days back from 13:37, up to 13:35
    assert plan.repairs == [
        (last - (60 * (i + 1) - 1) * MINUTE, last - 60 * i * MINUTE) for i in range(4)
    ]
    assert plan.deferred_minutes == plan.hole_minutes - 240
    # The next tick inside the backoff scans nothing; after it, running repairs use up the cap.
    assert _plan(plan.cursor, [], now=NOW + timedelta(seconds=30)).repairs == []
    done = [m for first, end in plan.repairs[:2] for m in minutes_between(first, end)]
    running = [_run(NEWEST, NEWEST, origin="minutes")] + [_run(*r) for r in plan.repairs[2:]]
    later = _plan(plan.cursor, done, running, now=NOW + timedelta(seconds=61))
    oldest = plan.repairs[3][0]
    assert later.repairs == [
        (oldest - 60 * MINUTE, oldest - MINUTE),
        (oldest - 120 * MINUTE, oldest - 61 * MINUTE),
    ]


@pytest.mark.parametrize(
    ("status", "age", "orphan"),
    [
        (STARTED, timedelta(seconds=899), False),
        (STARTED, timedelta(seconds=901), True),
        (STARTING, timedelta(seconds=901), True),
        (WAITING, timedelta(seconds=901), True),
        # Queued runs wait for a slot (possibly behind orphans) and always count.
        (QUEUED, timedelta(days=1), False),
    ],
)
def test_runs_older_than_the_run_timeout_are_orphans(status, age, orphan):
    hole = NEWEST - timedelta(hours=3)
    run = _run(hole, hole, status=status, age=age, origin="minutes")
    assert is_orphan(run, NOW, SETTINGS.run_timeout_seconds) is orphan
    ledger = [m for m in minutes_between(EARLIEST, NEWEST - MINUTE) if m != hole]
    plan = _plan(Cursor(last=NEWEST - MINUTE, since=EARLIEST), ledger, [run])
    assert plan.repairs == ([(hole, hole)] if orphan else [])
    assert plan.orphans == ([run] if orphan else [])


def test_minutes_of_live_runs_are_not_requested_again():
    last = NEWEST - MINUTE
    gap_first, gap_last = last - 9 * MINUTE, last
    ledger = [m for m in minutes_between(EARLIEST, last) if not gap_first <= m <= gap_last]
    busy = _run(last - 5 * MINUTE, last - 3 * MINUTE, origin="minutes")
    plan = _plan(Cursor(last=last, since=EARLIEST), ledger, [busy])
    assert plan.repairs == [(last - 2 * MINUTE, last), (gap_first, last - 6 * MINUTE)]


@pytest.mark.parametrize(
    ("present", "first", "last", "gaps"),
    [
        ([], 0, 4, [(0, 4)]),
        ([0, 1, 2, 3, 4], 0, 4, []),
        ([1, 3], 0, 4, [(4, 4), (2, 2), (0, 0)]),
        ([0, 4, 9], 0, 4, [(1, 3)]),
    ],
)
def test_ledger_gaps(present, first, last, gaps):
    def m(i):
        return NEWEST + i * MINUTE

    assert ledger_gaps([m(i) for i in present], m(first), m(last)) == [
        (m(a), m(b)) for a, b in gaps
    ]


@pytest.mark.parametrize(
    ("ranges", "busy", "left"),
    [
        ([(0, 9)], [], [(0, 9)]),
        ([(0, 9)], [(3, 4)], [(5, 9), (0, 2)]),
        ([(0, 9)], [(0, 9)], []),
        ([(0, 9), (20, 29)], [(5, 25)], [(26, 29), (0, 4)]),
        ([(0, 9)], [(-5, 0), (9, 15)], [(1, 8)]),
    ],
)
def test_subtract(ranges, busy, left):
    def r(pairs):
        return [(NEWEST + a * MINUTE, NEWEST + b * MINUTE) for a, b in pairs]

    assert subtract(r(ranges), r(busy)) == r(left)


@pytest.mark.parametrize(
    ("holes", "max_len", "limit", "runs"),
    [
        ([(0, 9)], 4, 10, [(6, 9), (2, 5), (0, 1)]),
        ([(0, 9)], 4, 2, [(6, 9), (2, 5)]),
        ([(0, 1), (5, 6)], 60, 10, [(5, 6), (0, 1)]),
        ([(0, 9)], 4, 0, []),
    ],
)
def test_newest_first_runs(holes, max_len, limit, runs):
    def r(pairs):
        return [(NEWEST + a * MINUTE, NEWEST + b * MINUTE) for a, b in pairs]

    assert newest_first_runs(r(holes), max_len, limit) == r(runs)


def test_describe_ranges():
    a = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
    text = describe_ranges([(a, a + 59 * MINUTE), (a - 60 * MINUTE, a - 60 * MINUTE)])
    assert text == "2026-11-24 10:00..10:59 (60 min), 2026-11-24 09:00 (1 min)"
    assert describe_ranges([(a, a)] * 3, limit=1).endswith("and 2 more")


# --- late-data sensor --------------------------------------------------------------------------

LATENESS_S, AUDIT_EXTRA_S, RECENT_S, FULL_SCAN_S = 7200, 3600, 900, 2700


def _late_check(
    full_scan_at: float = 0.0,
    now: datetime = NOW,
    earliest: datetime = EARLIEST,
    settle_seconds: int = 0,
    lateness_seconds: int = LATENESS_S,
    recent_seconds: int = RECENT_S,
) -> LateCheck | None:
    return plan_late_check(
        full_scan_at,
        now,
        earliest,
        settle_seconds,
        lateness_seconds,
        AUDIT_EXTRA_S,
        recent_seconds,
        FULL_SCAN_S,
    )


def at(hour: int, minute: int) -> datetime:
    return NOW.replace(hour=hour, minute=minute, second=0)


def test_first_late_check_scans_the_lateness_window_and_audit_margin():
    # 13:37:15 - 3 h = 10:37:15, floored; up to the newest closed minute (13:36) inclusive.
    assert _late_check() == LateCheck(at(10, 37), at(13, 37), True, NOW.timestamp())


@pytest.mark.parametrize(
    ("since_full_scan_s", "full_scan", "start"),
    [
        (60, False, at(13, 22)),  # recent minutes only: 15 minutes back
        (FULL_SCAN_S - 1, False, at(13, 22)),
        (FULL_SCAN_S, True, at(10, 37)),  # due exactly when the interval has passed
        (FULL_SCAN_S + 600, True, at(10, 37)),
    ],
)
def test_late_check_scans_everything_only_every_full_scan_interval(
    since_full_scan_s, full_scan, start
):
    last_full_scan = NOW.timestamp() - since_full_scan_s
    check = _late_check(full_scan_at=last_full_scan)
    # The cursor moves only when this tick is the full scan.
    expected_at = NOW.timestamp() if full_scan else last_full_scan
    assert check == LateCheck(start, at(13, 37), full_scan, expected_at)


def test_recent_late_check_never_reaches_past_the_lateness_window():
    check = _late_check(full_scan_at=NOW.timestamp(), lateness_seconds=600)
    assert check == LateCheck(at(13, 27), at(13, 37), False, NOW.timestamp())


def test_late_check_starts_at_the_first_minute_partition():
    check = _late_check(earliest=at(12, 0))
    assert check == LateCheck(at(12, 0), at(13, 37), True, NOW.timestamp())


def test_late_check_ends_after_the_newest_settled_minute():
    # At 13:37:02 with 3 s to settle, 13:36 has not settled yet: 13:35 is the newest due minute.
    now = NOW.replace(second=2)
    check = _late_check(full_scan_at=now.timestamp(), now=now, settle_seconds=3)
    assert check == LateCheck(at(13, 22), at(13, 36), False, now.timestamp())


@pytest.mark.parametrize(
    ("now", "earliest"),
    [
        (NOW, at(13, 37)),  # the partitions start at the minute still open
        (NOW.replace(second=2), at(13, 36)),  # 13:36 is closed but not settled for 3 s
    ],
)
def test_late_check_is_none_before_any_minute_is_due(now, earliest):
    assert _late_check(now=now, earliest=earliest, settle_seconds=3) is None


def test_split_late_recomputes_inside_the_lateness_window_and_records_older_counts():
    # Cutoff 13:37:15 - 2 h = 11:37:15: a minute starting before it is past the window.
    late = [
        (at(13, 30), 4, 0),
        (at(11, 38), 1, 0),  # the oldest minute still inside
        (at(11, 37), 2, 0),  # starts 15 s before the cutoff
        (at(11, 0), 5, 5),  # past the window, this count already recorded
        (at(10, 59), 7, 3),  # past the window, more points since the count was recorded
        (at(13, 31), 2, 0),  # a live run recomputes it already
        (at(10, 58), 3, 0),  # past the window, but a live run (a backfill) reads it
    ]
    due, ignored = split_late(late, NOW, LATENESS_S, iter([at(13, 31), at(12, 0), at(10, 58)]))
    assert due == [at(13, 30), at(11, 38)]
    assert ignored == [(at(11, 37), 2), (at(10, 59), 7)]


def test_split_late_keeps_a_minute_starting_at_the_cutoff():
    now = at(13, 37)
    due, ignored = split_late([(at(11, 37), 1, 0), (at(11, 36), 1, 0)], now, LATENESS_S, [])
    assert (due, ignored) == ([at(11, 37)], [(at(11, 36), 1)])


def test_split_late_of_no_changed_minute_plans_nothing():
    assert split_late([], NOW, LATENESS_S, [at(13, 30)]) == ([], [])
