"""The hierarchy's cost per window: one household 5-minute window and one device hour."""

from __future__ import annotations

import statistics
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from energy_pipeline.devtools.bench.common import BenchTargets
from energy_pipeline.hierarchy import WindowWrite, replace_device_1h, replace_household_5m
from energy_pipeline.storage import connect

HIERARCHY_RUNS = 5  # timed writes per grain (their median is reported)
FIVE_MINUTES = timedelta(minutes=5)
HOUR = timedelta(hours=1)


def _minute_rows(conn: psycopg.Connection, start: datetime, end: datetime) -> int:
    row = conn.execute(
        "SELECT count(*) FROM energy.device_rollup_1m WHERE bucket >= %s AND bucket < %s",
        (start, end),
    ).fetchone()
    return int(row[0]) if row else 0


def _timed(write: Any, conn: psycopg.Connection, start: datetime, end: datetime) -> tuple:
    t = time.perf_counter()
    done: WindowWrite = write(conn, start, end, datetime.now(UTC))
    return time.perf_counter() - t, done


def measure_hierarchy(targets: BenchTargets, start: datetime, end: datetime) -> dict[str, Any]:
    """Seconds to compute one window of each grain from the minute rows, as the assets do.

    Every device has minute rows in [start, end) (`end` on the hour). The household windows are
    the last `HIERARCHY_RUNS` 5-minute windows before `end` that hold any of those minutes (taken
    again in turn when there are fewer), the device hour is the hour before `end`, written
    `HIERARCHY_RUNS` times; each write replaces the window's rows in one transaction, as a
    sensor-requested run does.
    """
    grains: dict[str, Any] = {}
    with connect(targets.pg_dsn) as conn:
        conn.execute("ANALYZE energy.device_rollup_1m")
        held = min(HIERARCHY_RUNS, -(-(end - start) // FIVE_MINUTES))
        five = [
            (end - FIVE_MINUTES * (i % held + 1), end - FIVE_MINUTES * (i % held))
            for i in range(HIERARCHY_RUNS)
        ]
        hour = [(end - HOUR, end)] * HIERARCHY_RUNS
        for grain, write, windows in (
            ("household_5m", replace_household_5m, five),
            ("device_1h", replace_device_1h, hour),
        ):
            seconds, rows, minute_rows = [], [], []
            for s, e in windows:
                took, done = _timed(write, conn, s, e)
                seconds.append(took)
                rows.append(done.rows_written)
                minute_rows.append(_minute_rows(conn, s, e))
            grains[grain] = {
                "windows_timed": len(windows),
                "minute_rows_per_window": int(statistics.median(minute_rows)),
                "rows_written_per_window": int(statistics.median(rows)),
                "seconds_median": statistics.median(seconds),
                "seconds_max": max(seconds),
            }
    return grains
