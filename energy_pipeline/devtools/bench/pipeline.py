"""The pipeline measured: single minutes against both references, a ranged run, scaling."""

from __future__ import annotations

import os
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import datetime, timedelta
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import polars as pl
import psycopg

from energy_pipeline.config import READ_PARALLELISM
from energy_pipeline.devtools.bench.common import (
    MEASUREMENT,
    RAW_TABLE,
    BenchOptions,
    BenchTargets,
    Progress,
    copy_raw,
    load_dataset,
    raw_source,
    reset_influx,
    wait_for_quiet_influx,
)
from energy_pipeline.devtools.simulator import build_fleet, generate_points
from energy_pipeline.devtools.telemetry_writer import write_points
from energy_pipeline.influx import quote_ident, series_slices, to_ns
from energy_pipeline.ingest import chunk_windows, process_window
from energy_pipeline.sources import current_checksums, read_window
from energy_pipeline.storage import connect, upsert_devices

SCALING_RUNS = 5  # measured minutes per fleet size (their median is reported)


def measure_minutes(
    targets: BenchTargets,
    conn: psycopg.Connection,
    start: datetime,
    minutes: int,
    fresh_fleet: pl.DataFrame | None = None,
    seed: int = 42,
) -> dict[str, Any]:
    """Pipeline per stage and both references, minute by minute over the same windows.

    With `fresh_fleet`, each minute is written just before it is measured, as on the live path,
    where the newest minute is still in InfluxDB's in-memory cache. Without it, the minutes come
    from compacted history, where InfluxDB decodes whole ~1,000-point blocks to return 60 points
    per series. The pipeline and InfluxDB's GROUP BY take turns going first.
    """
    influx = targets.influx()
    stages: dict[str, list[float]] = {k: [] for k in ("read", "validate", "roll_up", "write")}
    totals, influx_s, pg_s, points = [], [], [], []
    # The same answer as the pipeline's rollup, voltage included.
    groupby = (
        "SELECT mean(power_w) AS power_w_avg, min(power_w) AS power_w_min, max(power_w) AS "
        "power_w_max, sum(energy_wh) AS energy_wh_sum, count(power_w) AS sample_count, "
        "mean(voltage_v), min(voltage_v), max(voltage_v) "
        f"FROM {quote_ident(MEASUREMENT)} WHERE time >= $start AND time < $end "
        "GROUP BY time(1m), device_id"
    )
    # The read before it was verified: two fields, no count, no types (what a read used to cost).
    unverified = [
        'SELECT "power_w", "energy_wh", "device_id", "household_id" '
        f"FROM {quote_ident(MEASUREMENT)} "
        f'WHERE time >= $start AND time < $end{c} GROUP BY "device_id"'
        for c in series_slices(READ_PARALLELISM)
    ]
    unverified_s: list[float] = []
    raw_sql = (
        f"SELECT device_id, date_trunc('minute', time), max(household_id), count(power_w), "
        f"avg(power_w), min(power_w), max(power_w), sum(energy_wh) FROM {RAW_TABLE} "
        "WHERE time >= %s AND time < %s GROUP BY 1, 2"
    )
    for i in range(minutes):
        s, e = start + timedelta(minutes=i), start + timedelta(minutes=i + 1)
        if fresh_fleet is not None:
            fresh = generate_points(fresh_fleet, to_ns(s), 60, seed=seed)
            write_points(influx, fresh, MEASUREMENT)
            copy_raw(conn, fresh)
        params = {"start": to_ns(s), "end": to_ns(e)}
        if i % 2:  # the references and the pipeline take turns reading the minute first
            t = time.perf_counter()
            influx.query_frame(groupby, params)
            influx_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            with ThreadPoolExecutor(len(unverified)) as pool:
                list(pool.map(influx.query_frame, unverified, [params] * len(unverified)))
            unverified_s.append(time.perf_counter() - t)
        stats = process_window(raw_source(influx), conn, s, e, chunk_minutes=1)
        for k in stages:
            stages[k].append(stats.seconds[k])
        totals.append(sum(stats.seconds.values()))
        points.append(stats.points_read)
        if not i % 2:
            t = time.perf_counter()
            with ThreadPoolExecutor(len(unverified)) as pool:
                list(pool.map(influx.query_frame, unverified, [params] * len(unverified)))
            unverified_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            influx.query_frame(groupby, params)
            influx_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        conn.execute(raw_sql, (s, e)).fetchall()
        pg_s.append(time.perf_counter() - t)
    in_asset = statistics.median(totals)
    return {
        "minutes_measured": minutes,
        "points_per_minute": int(statistics.median(points)),
        "stages_s": {k: statistics.median(v) for k, v in stages.items()},
        "in_asset_s": in_asset,
        "in_asset_max_s": max(totals),
        "points_per_s": statistics.median(points) / in_asset,
        "influx_groupby_s": statistics.median(influx_s),
        "influx_ratio": in_asset / statistics.median(influx_s),
        "pg_raw_groupby_s": statistics.median(pg_s),
        "pg_raw_ratio": in_asset / statistics.median(pg_s),
        "unverified_read_s": statistics.median(unverified_s),
    }


def _cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) process `pid` has used so far; NaN when it cannot be read."""
    if pid is None:
        return float("nan")
    try:
        # Fields after the parenthesised command name; utime and stime are the 12th and 13th.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _ranged_child(targets: BenchTargets, start: datetime, minutes: int, chunk: int) -> dict:
    """The ranged run, then the same range only read from InfluxDB, with the CPU each took.

    The CPU seconds of InfluxDB, this process and its PostgreSQL backend, divided by the cores,
    are the shortest wall time this much work could take here: the floor for the ranged run.
    """
    end = start + timedelta(minutes=minutes)
    influx = targets.influx()
    with connect(targets.pg_dsn) as conn:
        backend = conn.info.backend_pid
        before = (_cpu_s(targets.influx_pid), _own_cpu_s(), _cpu_s(backend))
        t = time.perf_counter()
        stats = process_window(raw_source(influx), conn, start, end, chunk)
        seconds = time.perf_counter() - t
        after = (_cpu_s(targets.influx_pid), _own_cpu_s(), _cpu_s(backend))
    names = ("influxdb", "pipeline", "postgres")
    cpu = {k: b - a for k, a, b in zip(names, before, after, strict=True)}
    # The reference: InfluxDB streaming the same range the same way, nothing done with it.
    influx_before, t = _cpu_s(targets.influx_pid), time.perf_counter()
    for window in chunk_windows(start, end, chunk):
        read_window(influx, MEASUREMENT, *window, parallel=READ_PARALLELISM)
    read_only_s = time.perf_counter() - t
    cores = os.cpu_count() or 1
    return {
        "minutes": minutes,
        "chunk_minutes": chunk,
        "seconds": seconds,
        "points": stats.points_read,
        "points_per_s": stats.points_read / seconds,
        "stages_s": stats.seconds,
        # ru_maxrss is in KiB on Linux; the child's own peak, imports included.
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cpu_s": cpu,
        "cores": cores,
        "cpu_floor_s": sum(cpu.values()) / cores,
        "read_only_s": read_only_s,
        "read_only_influxdb_cpu_s": _cpu_s(targets.influx_pid) - influx_before,
    }


def measure_ranged(targets: BenchTargets, start: datetime, minutes: int, chunk: int) -> dict:
    """One ranged run over `minutes`, in a fresh process so its peak memory is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_ranged_child, targets, start, minutes, chunk).result()


def measure_scaling(
    targets: BenchTargets, conn: psycopg.Connection, start: datetime, opts: BenchOptions,
    say: Progress,
) -> list[dict[str, Any]]:  # fmt: skip
    """In-asset seconds per minute at each fleet size, each in its own InfluxDB database.

    The sizes take turns, one minute each, so background work on the machine (autovacuum after
    the bench's big loads, InfluxDB compactions) weighs on all of them alike.
    """
    databases = {}
    for k, n in enumerate(opts.scaling):
        minute = start - timedelta(minutes=5 * (k + 1))
        influx = targets.influx(f"{targets.influx_database}_scale_{n}")
        upsert_devices(conn, fleet := build_fleet(n, seed=opts.seed))
        reset_influx(influx)
        load_dataset(influx, None, fleet, minute, 2, opts.seed, lambda _m: None)
        databases[n] = (influx, minute)
    for influx, _ in databases.values():
        wait_for_quiet_influx(influx)
    seconds: dict[int, list[float]] = {n: [] for n in opts.scaling}
    points: dict[int, int] = {}
    for i in range(SCALING_RUNS + 1):
        # Rotate who goes first, so no size always follows the same other one.
        order = opts.scaling[i % len(opts.scaling) :] + opts.scaling[: i % len(opts.scaling)]
        for n in order:
            influx, minute = databases[n]
            s = minute + timedelta(minutes=i % 2)
            stats = process_window(
                raw_source(influx),
                conn,
                s,
                s + timedelta(minutes=1),
                1,
            )
            seconds[n].append(sum(stats.seconds.values()))
            points[n] = stats.points_read
    rows = []
    for n in opts.scaling:
        # The first run pays for cold caches and new connections, which is not cost per point.
        median = statistics.median(seconds[n][1:])
        rows.append({"devices": n, "points": points[n], "in_asset_s": median,
                     "us_per_point": median / points[n] * 1e6})  # fmt: skip
        say(f"  scaling {n} devices: {median:.3f} s/minute")
    return rows


def measure_late_check(targets: BenchTargets, start: datetime, minutes: int) -> dict[str, Any]:
    """The late-data check's InfluxDB query over `minutes` minutes: checksums against counts.

    The checksum (count and sum of three fields) is what the sensor runs; the count of two
    fields is what it ran before corrected values were detected. Medians of three runs each.
    """
    influx = targets.influx()
    end = start + timedelta(minutes=minutes)
    counts_only = (
        'SELECT count("power_w"), count("energy_wh") FROM '
        f"{quote_ident(MEASUREMENT)} WHERE time >= $start AND time < $end GROUP BY time(1m)"
    )
    params = {"start": to_ns(start), "end": to_ns(end)}
    checksum_s, counts_s = [], []
    for _ in range(3):
        t = time.perf_counter()
        current_checksums(influx, MEASUREMENT, start, end)
        checksum_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        influx.query_json(counts_only, params)
        counts_s.append(time.perf_counter() - t)
    return {
        "minutes": minutes,
        "checksum_s": statistics.median(checksum_s),
        "counts_only_s": statistics.median(counts_s),
    }
