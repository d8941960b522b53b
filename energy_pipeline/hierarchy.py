"""Coarser rollups computed from the minute rows: household × 5 minutes and device × hour.

Each window write replaces the window's rows exactly, in one transaction, from
`energy.device_rollup_1m` (`INSERT … SELECT`; see docs/design.md for SQL vs Polars), and records the
window in `energy.rollup_windows` with how many of its minutes the ledger held. Also here: the
consistency checks of a window against its minute rows. No Dagster here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import psycopg

from energy_pipeline.storage import prepare_partitions

HOUSEHOLD_5M = "household_rollup_5m"
DEVICE_1H = "device_rollup_1h"
GRAIN_LENGTH = {HOUSEHOLD_5M: timedelta(minutes=5), DEVICE_1H: timedelta(hours=1)}
# Buckets are aligned to UTC (date_trunc on timestamptz would follow the session's TimeZone).
_ORIGIN = "2000-01-01 00:00:00+00"

# Float sums take their inputs in a fixed order (`sum(x ORDER BY …)`), so a re-run writes
# bit-identical values whatever plan PostgreSQL picks.
# The minute rows a window reads; the household a device was registered to at the minute wins
# over the minute's tag.
_MINUTES = """
    SELECT r.device_id, r.bucket AS minute,
           date_bin(%(step)s::interval, r.bucket, %(origin)s::timestamptz) AS bucket,
           coalesce(d.household_id, r.household_id) AS household_id,
           r.sample_count, r.power_w_avg, r.power_w_min, r.power_w_max, r.energy_wh_sum,
           r.rejected_count
    FROM energy.device_rollup_1m r
    -- The household the device was registered to at that minute (migration 0014).
    LEFT JOIN (
        SELECT device_id, household_id, valid_from,
               lead(valid_from, 1, 'infinity') OVER w AS valid_to
        FROM energy.device_households
        WINDOW w AS (PARTITION BY device_id ORDER BY valid_from)
    ) d ON d.device_id = r.device_id AND r.bucket >= d.valid_from AND r.bucket < d.valid_to
    WHERE r.bucket >= %(start)s AND r.bucket < %(end)s
"""

_INSERT_HOUSEHOLD_5M = f"""
WITH m AS ({_MINUTES}),
per_minute AS (
    -- The household's total draw in a minute: the sum of its devices' mean power. NULL when no
    -- device had a valid sample that minute (such minutes are left out of the average).
    SELECT household_id, bucket, minute, sum(power_w_avg ORDER BY device_id) AS draw_w
    FROM m GROUP BY household_id, bucket, minute
),
draw AS (
    SELECT household_id, bucket, avg(draw_w ORDER BY minute) AS power_w_avg,
           max(draw_w) AS power_w_peak
    FROM per_minute GROUP BY household_id, bucket
),
totals AS (
    SELECT household_id, bucket, count(DISTINCT device_id) AS device_count,
           sum(sample_count) AS sample_count,
           sum(energy_wh_sum ORDER BY device_id, minute) AS energy_wh_sum
    FROM m GROUP BY household_id, bucket
)
INSERT INTO energy.household_rollup_5m (household_id, bucket, device_count, sample_count,
    energy_wh_sum, power_w_avg, power_w_peak, computed_at)
SELECT t.household_id, t.bucket, t.device_count, t.sample_count, t.energy_wh_sum,
       d.power_w_avg, d.power_w_peak, %(computed_at)s
FROM totals t JOIN draw d USING (household_id, bucket)
"""

_INSERT_DEVICE_1H = f"""
WITH m AS ({_MINUTES})
INSERT INTO energy.device_rollup_1h (device_id, bucket, household_id, sample_count, power_w_avg,
    power_w_min, power_w_max, energy_wh_sum, rejected_count, computed_at)
SELECT device_id, bucket,
       -- the household the device had at the hour's newest minute, else that minute's tag
       (array_agg(household_id ORDER BY minute DESC))[1],
       sum(sample_count),
       -- sample-weighted mean of the minute means = mean over every valid sample of the hour
       sum(power_w_avg * sample_count ORDER BY minute) / nullif(sum(sample_count), 0),
       min(power_w_min), max(power_w_max), sum(energy_wh_sum ORDER BY minute),
       sum(rejected_count),
       %(computed_at)s
FROM m GROUP BY device_id, bucket
"""

_INSERT_WINDOWS = """
INSERT INTO energy.rollup_windows (grain, bucket, minutes_covered, minutes_expected,
    source_computed_at, computed_at)
SELECT %(grain)s, b.bucket, count(l.bucket), %(expected)s, max(l.computed_at), %(computed_at)s
FROM generate_series(%(start)s::timestamptz, %(end)s::timestamptz - %(step)s::interval,
                     %(step)s::interval) AS b(bucket)
LEFT JOIN energy.rollup_minutes l
       ON l.bucket >= b.bucket AND l.bucket < b.bucket + %(step)s::interval
GROUP BY b.bucket
"""

_SUM_CHECK = """
WITH coarse AS (
    SELECT bucket, sum(energy_wh_sum) AS energy_wh, sum(sample_count) AS samples
    FROM energy.{table} WHERE bucket >= %(start)s AND bucket < %(end)s GROUP BY bucket
),
fine AS (
    SELECT date_bin(%(step)s::interval, bucket, %(origin)s::timestamptz) AS bucket,
           sum(energy_wh_sum) AS energy_wh, sum(sample_count) AS samples
    FROM energy.device_rollup_1m WHERE bucket >= %(start)s AND bucket < %(end)s GROUP BY 1
)
SELECT b.bucket, coalesce(c.energy_wh, 0), coalesce(f.energy_wh, 0),
       coalesce(c.samples, 0), coalesce(f.samples, 0)
FROM generate_series(%(start)s::timestamptz, %(end)s::timestamptz - %(step)s::interval,
                     %(step)s::interval) AS b(bucket)
LEFT JOIN coarse c USING (bucket) LEFT JOIN fine f USING (bucket)
ORDER BY b.bucket
"""

_COVERAGE = """
SELECT b.bucket, w.minutes_covered, w.minutes_expected, count(l.bucket)
FROM generate_series(%(start)s::timestamptz, %(end)s::timestamptz - %(step)s::interval,
                     %(step)s::interval) AS b(bucket)
LEFT JOIN energy.rollup_windows w ON w.grain = %(grain)s AND w.bucket = b.bucket
LEFT JOIN energy.rollup_minutes l
       ON l.bucket >= b.bucket AND l.bucket < b.bucket + %(step)s::interval
GROUP BY b.bucket, w.minutes_covered, w.minutes_expected
ORDER BY b.bucket
"""

_PENDING = """
WITH ledger AS (
    SELECT date_bin(%(step)s::interval, bucket, %(origin)s::timestamptz) AS bucket,
           count(*) AS minutes_covered, max(computed_at) AS newest
    FROM energy.rollup_minutes WHERE bucket >= %(start)s AND bucket < %(end)s GROUP BY 1
)
SELECT l.bucket, l.minutes_covered, l.newest, w.bucket IS NOT NULL, w.source_computed_at
FROM ledger l
LEFT JOIN energy.rollup_windows w ON w.grain = %(grain)s AND w.bucket = l.bucket
WHERE w.bucket IS NULL OR w.source_computed_at IS DISTINCT FROM l.newest
ORDER BY l.bucket
"""

# Relative tolerance of the energy comparison: the same doubles summed in another order.
ENERGY_REL_TOLERANCE = 1e-9


@dataclass(frozen=True)
class WindowWrite:
    """What one window write did, in all and per window."""

    rows_written: int
    windows: int
    minutes_covered: int
    minutes_expected: int
    # Each window's own figures, by bucket: (rows written, minutes covered) of `minutes_expected
    # / windows` each.
    per_window: dict[datetime, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class SumCheck:
    """One window's coarse sums next to the sums of its minute rows."""

    bucket: datetime
    energy_wh: float
    minute_energy_wh: float
    samples: int
    minute_samples: int

    @property
    def passed(self) -> bool:
        tolerance = ENERGY_REL_TOLERANCE * max(abs(self.minute_energy_wh), 1.0)
        return (
            self.samples == self.minute_samples
            and abs(self.energy_wh - self.minute_energy_wh) <= tolerance
        )


@dataclass(frozen=True)
class Coverage:
    """One window's recorded minutes covered out of expected, and the ledger's count now."""

    bucket: datetime
    minutes_covered: int | None
    minutes_expected: int
    ledger_minutes_now: int

    @property
    def complete(self) -> bool:
        return self.minutes_covered == self.minutes_expected


@dataclass(frozen=True)
class PendingWindow:
    """A window whose ledger minutes differ from what its last computation read."""

    bucket: datetime
    minutes_covered: int
    newest_minute_computed_at: datetime
    recorded: bool
    recorded_source_computed_at: datetime | None


def window_lock(grain: str) -> str:
    """Advisory-lock name serialising the writers of one coarse table."""
    return f"energy.{grain}:write"


def _params(grain: str, start: datetime, end: datetime) -> dict:
    step = GRAIN_LENGTH[grain]
    if start >= end or (start - datetime(2000, 1, 1, tzinfo=UTC)) % step or (end - start) % step:
        raise ValueError(f"{start}..{end} is not a whole number of {grain} windows")
    return {
        "grain": grain,
        "start": start,
        "end": end,
        "step": step,
        "origin": _ORIGIN,
        "expected": int(step / timedelta(minutes=1)),
    }


def replace_windows(
    conn: psycopg.Connection, grain: str, start: datetime, end: datetime, computed_at: datetime
) -> WindowWrite:
    """Replace every row of `energy.<grain>` in [start, end), and its `rollup_windows` rows,
    with what the minute rows hold now; atomically, and identically when re-run.

    `conn` must be in autocommit mode (as `storage.connect` opens it). The table's advisory lock
    is taken at session level *before* the transaction begins, so the transaction's snapshot
    (REPEATABLE READ: every statement reads the same minute rows and ledger) is taken after a
    concurrent writer of the same table has committed, never before.
    """
    params = {**_params(grain, start, end), "computed_at": computed_at}
    insert = _INSERT_HOUSEHOLD_5M if grain == HOUSEHOLD_5M else _INSERT_DEVICE_1H
    # Partitions come first, in their own short transaction (see storage.replace_minutes).
    prepare_partitions(conn, grain, start, end - timedelta(microseconds=1))
    lock = window_lock(grain)
    conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (lock,))
    try:
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            cur.execute(
                f"DELETE FROM energy.{grain} WHERE bucket >= %(start)s AND bucket < %(end)s",
                params,
            )
            cur.execute(insert, params)
            rows = cur.rowcount
            cur.execute(
                f"SELECT bucket, count(*) FROM energy.{grain} "
                "WHERE bucket >= %(start)s AND bucket < %(end)s GROUP BY bucket",
                params,
            )
            rows_by_window: dict[datetime, int] = dict(cur.fetchall())
            cur.execute(
                "DELETE FROM energy.rollup_windows "
                "WHERE grain = %(grain)s AND bucket >= %(start)s AND bucket < %(end)s",
                params,
            )
            cur.execute(_INSERT_WINDOWS + " RETURNING bucket, minutes_covered", params)
            covered: dict[datetime, int] = dict(cur.fetchall())
    finally:
        conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (lock,))
    return WindowWrite(
        rows_written=rows,
        windows=len(covered),
        minutes_covered=sum(covered.values()),
        minutes_expected=params["expected"] * len(covered),
        per_window={
            bucket: (int(rows_by_window.get(bucket, 0)), int(n))
            for bucket, n in sorted(covered.items())
        },
    )


def replace_household_5m(
    conn: psycopg.Connection, start: datetime, end: datetime, computed_at: datetime
) -> WindowWrite:
    """Recompute `energy.household_rollup_5m` for the 5-minute windows in [start, end)."""
    return replace_windows(conn, HOUSEHOLD_5M, start, end, computed_at)


def replace_device_1h(
    conn: psycopg.Connection, start: datetime, end: datetime, computed_at: datetime
) -> WindowWrite:
    """Recompute `energy.device_rollup_1h` for the hours in [start, end)."""
    return replace_windows(conn, DEVICE_1H, start, end, computed_at)


def sum_checks(
    conn: psycopg.Connection, grain: str, start: datetime, end: datetime
) -> list[SumCheck]:
    """Per window in [start, end): energy and sample sums of the coarse rows vs its minute rows."""
    params = _params(grain, start, end)
    rows = conn.execute(_SUM_CHECK.format(table=grain), params).fetchall()
    return [SumCheck(b, float(e), float(me), int(s), int(ms)) for b, e, me, s, ms in rows]


def coverage(
    conn: psycopg.Connection, grain: str, start: datetime, end: datetime
) -> list[Coverage]:
    """Per window in [start, end): minutes covered / expected as recorded at its computation."""
    params = _params(grain, start, end)
    rows = conn.execute(_COVERAGE, params).fetchall()
    return [
        Coverage(b, covered, expected or params["expected"], int(now))
        for b, covered, expected, now in rows
    ]


def pending_windows(
    conn: psycopg.Connection, grain: str, start: datetime, end: datetime
) -> list[PendingWindow]:
    """Windows in [start, end) holding ledger minutes whose newest `computed_at` differs from the
    one their last computation read (or never computed); one grouped query over the ledger."""
    params = _params(grain, start, end)
    return [PendingWindow(*row) for row in conn.execute(_PENDING, params).fetchall()]


# --- Planning: which windows a sensor tick requests (pure) -------------------------------------


@dataclass(frozen=True)
class WindowRun:
    """A run of one grain over windows first..last (inclusive starts): when it was created and,
    for a failed one, when it ended."""

    first: datetime
    last: datetime
    created: datetime
    ended: datetime | None = None

    def covers(self, bucket: datetime) -> bool:
        return self.first <= bucket <= self.last


@dataclass(frozen=True)
class WindowRequest:
    """Windows first..last (inclusive starts) to compute in one run, under a stable run key."""

    first: datetime
    last: datetime
    run_key: str


@dataclass(frozen=True)
class WindowPlanSettings:
    """The knobs of the window planner."""

    lateness: timedelta
    max_windows_per_run: int
    max_runs_in_flight: int = 4
    retry_backoff: timedelta = timedelta(seconds=60)


def _key(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%d-%H:%M")


def plan_windows(
    grain: str,
    pending: list[PendingWindow],
    in_flight: list[WindowRun],
    failed: list[WindowRun],
    now: datetime,
    settings: WindowPlanSettings,
) -> list[WindowRequest]:
    """The runs to request for `grain` on one tick, newest windows first.

    A pending window is due once all its minutes are in the ledger, or once it has been closed
    for the lateness window (then with what exists). It is skipped while a run created after its
    newest minute was computed is in flight (that run reads it), and for `retry_backoff` after
    such a run failed. Run keys are stable per (windows, newest minute computed_at of each), so
    a window is requested again exactly when its inputs change, or after a failure (the key then
    names the failure, since Dagster skips a reused key even when its run failed).
    """
    step = GRAIN_LENGTH[grain]
    expected = int(step / timedelta(minutes=1))
    due: list[tuple[datetime, datetime, datetime | None]] = []
    for w in sorted(pending, key=lambda p: p.bucket, reverse=True):
        stamp = w.newest_minute_computed_at
        if w.minutes_covered < expected and now < w.bucket + step + settings.lateness:
            continue
        if any(r.covers(w.bucket) and r.created >= stamp for r in in_flight):
            continue
        ends = [r.ended for r in failed if r.covers(w.bucket) and r.created >= stamp and r.ended]
        retry = max(ends) if ends else None
        if retry is not None and now - retry < settings.retry_backoff:
            continue
        due.append((w.bucket, stamp, retry))
    groups: list[list[tuple[datetime, datetime, datetime | None]]] = []
    for item in due:  # newest first: extend a group backwards while contiguous
        if (
            groups
            and groups[-1][-1][0] - item[0] == step
            and len(groups[-1]) < settings.max_windows_per_run
        ):
            groups[-1].append(item)
        else:
            groups.append([item])
    slots = max(0, settings.max_runs_in_flight - len(in_flight))
    requests = []
    for group in groups[:slots]:
        group.reverse()
        first, last = group[0][0], group[-1][0]
        stamps = ",".join(str(int(s.timestamp() * 1_000_000)) for _, s, _ in group)
        digest = stamps if len(group) == 1 else hashlib.sha1(stamps.encode()).hexdigest()[:16]
        retries = [r for _, _, r in group if r is not None]
        suffix = f":retry-{int(max(retries).timestamp())}" if retries else ""
        requests.append(
            WindowRequest(first, last, f"{grain}:{_key(first)}:{_key(last)}:{digest}{suffix}")
        )
    return requests
