"""Writes simulated telemetry through InfluxDB's `/write`, as history or live at 1 Hz per device.

Devices are registered in PostgreSQL first, as a device-management system would do.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime, timedelta

import polars as pl

from energy_pipeline.config import Settings
from energy_pipeline.influx import InfluxClient
from energy_pipeline.lineprotocol import encode_points
from energy_pipeline.simulator import build_fleet, generate_points, inject_faults
from energy_pipeline.storage import connect, upsert_devices

NS = 1_000_000_000
# Lines per POST: large enough to amortise HTTP, small enough to stay far below body limits.
WRITE_BATCH_LINES = 50_000
# Live mode writes "late" points this long after their timestamp.
LIVE_LATE_DELAY_S = 90


@dataclass(frozen=True)
class SimulationOptions:
    devices: int = 200
    seed: int = 42
    faults: tuple[str, ...] = ()
    fault_rate: float = 0.01
    hostile_ids: bool = False
    register: bool = True


def write_points(
    influx: InfluxClient,
    points: pl.DataFrame,
    measurement: str,
    pool: Executor | None = None,
) -> int:
    """Encode and POST points in batches (concurrently on `pool` if given); returns the lines."""
    batches = [
        encode_points(points.slice(offset, WRITE_BATCH_LINES), measurement)
        for offset in range(0, points.height, WRITE_BATCH_LINES)
    ]
    if pool is None:
        for body in batches:
            influx.write_lines(body)
    else:
        for done in [pool.submit(influx.write_lines, body) for body in batches]:
            done.result()
    return points.height


def prepare_fleet(settings: Settings, options: SimulationOptions) -> pl.DataFrame:
    fleet = build_fleet(options.devices, seed=options.seed, hostile_ids=options.hostile_ids)
    if options.register:
        with connect(settings.pg_dsn) as conn:
            upsert_devices(conn, fleet)
    return fleet


def _say(message: str) -> None:
    print(message, flush=True)  # noqa: T201 - progress output of a command-line tool


def run_history(
    influx: InfluxClient,
    settings: Settings,
    options: SimulationOptions,
    start: datetime,
    end: datetime,
) -> dict[str, int]:
    """Write every second of [start, end) minute by minute; late points go last."""
    fleet = prepare_fleet(settings, options)
    totals: dict[str, int] = {"points": 0}
    late: list[pl.DataFrame] = []
    minutes = int((end - start).total_seconds() // 60)
    started = time.monotonic()
    for i in range(minutes):
        t0 = start + timedelta(minutes=i)
        points = generate_points(fleet, int(t0.timestamp()) * NS, 60, seed=options.seed + i)
        if options.faults:
            batch = inject_faults(points, options.faults, options.fault_rate, options.seed + i)
            points = batch.points
            late.append(batch.late)
            for fault, n in batch.counts.items():
                totals[fault] = totals.get(fault, 0) + n
        totals["points"] += write_points(influx, points, settings.influx_measurement)
        if (i + 1) % 5 == 0 or i + 1 == minutes:
            rate = totals["points"] / max(time.monotonic() - started, 1e-9)
            _say(
                f"wrote minute {i + 1}/{minutes} ({t0:%H:%M} UTC): {totals['points']:,} points, "
                f"{rate:,.0f} points/s"
            )
    if late:
        totals["points"] += write_points(influx, pl.concat(late), settings.influx_measurement)
    _say(f"done: {totals}")
    return totals


def run_live(
    influx: InfluxClient,
    settings: Settings,
    options: SimulationOptions,
    duration_s: float = 0,
    stop: threading.Event | None = None,
) -> dict[str, int]:
    """Write one point per device each second until interrupted, `duration_s` elapsed or `stop`
    is set."""
    fleet = prepare_fleet(settings, options)
    _say(f"live: {fleet.height} devices at 1 Hz into {influx.url} db={influx.database}")
    totals = {"points": 0, "seconds": 0}
    delayed: deque[tuple[float, pl.DataFrame]] = deque()
    started = time.time()
    second = int(started)
    try:
        while (not duration_s or time.time() - started < duration_s) and not (
            stop is not None and stop.is_set()
        ):
            # Write each second once it has passed, as devices report what they measured.
            time.sleep(max(0.0, second + 1 - time.time()))
            points = generate_points(fleet, second * NS, 1, seed=options.seed)
            if options.faults:
                batch = inject_faults(points, options.faults, options.fault_rate, second)
                points = batch.points
                if batch.late.height:
                    delayed.append((time.time() + LIVE_LATE_DELAY_S, batch.late))
            while delayed and delayed[0][0] <= time.time():
                points = pl.concat([points, delayed.popleft()[1]])
            totals["points"] += write_points(influx, points, settings.influx_measurement)
            totals["seconds"] += 1
            second += 1
            if time.time() - second > 5:  # fell behind (machine busy): skip ahead, say so
                skipped = int(time.time()) - second
                _say(f"live: {skipped}s behind, skipping ahead")
                second += skipped
            if totals["seconds"] % 10 == 0:
                _say(f"live: {totals['points']:,} points in {totals['seconds']} s")
    except KeyboardInterrupt:
        pass
    return totals
