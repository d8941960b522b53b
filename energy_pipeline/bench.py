"""`energy-pipeline bench`: measured figures for the minute path, side by side with references.

Loads a seeded dataset at 1 Hz per device into InfluxDB and into a raw PostgreSQL table, then
measures in one run: the pipeline per stage for single minutes, a long ranged run (peak memory in a
child process), InfluxDB's own GROUP BY and PostgreSQL's GROUP BY over the raw table for the same
minutes, concurrent BI reads on rollups versus the raw table while the pipeline writes, and cost per
point at several fleet sizes. Timings are reported, never asserted.
"""

from __future__ import annotations

import os
import random
import resource
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from dataclasses import replace as dataclasses_replace
from datetime import UTC, datetime, timedelta
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import polars as pl
import psycopg
from psycopg import sql

from energy_pipeline.influx import InfluxClient, quote_ident, to_ns
from energy_pipeline.ingest import chunk_windows, process_window
from energy_pipeline.rollups import roll_up_minutes
from energy_pipeline.services import LocalPostgres
from energy_pipeline.simulator import build_fleet, generate_points
from energy_pipeline.storage import connect, copy_frame, replace_minutes, upsert_devices
from energy_pipeline.telemetry_writer import write_points

NS = 1_000_000_000
MEASUREMENT = "telemetry"
RAW_TABLE = "bench_raw_telemetry"
SCALING_RUNS = 5  # measured minutes per fleet size (their median is reported)
Progress = Callable[[str], None]


@dataclass(frozen=True)
class BenchOptions:
    devices: int = 5_000
    minutes: int = 10
    long_minutes: int = 60  # 0 skips the long ranged run
    chunk_minutes: int = 5
    readers: int = 32
    read_seconds: float = 60.0
    scaling: tuple[int, ...] = (500, 1_000, 2_000, 5_000)
    seed: int = 42
    read_hours: int = 24  # the BI readers' window
    read_households: int = 20  # sampled households that get the whole window in both tables

    @classmethod
    def quick(cls) -> BenchOptions:
        return cls(devices=500, minutes=3, long_minutes=0, readers=4, read_seconds=3.0,
                   scaling=(100, 250, 500), read_hours=1, read_households=2)  # fmt: skip


@dataclass
class BenchTargets:
    """Where the bench writes: an InfluxDB database and a PostgreSQL database (both dedicated)."""

    influx_url: str
    influx_database: str
    pg_dsn: str
    influx_auth: dict[str, str] = field(default_factory=dict)
    # The local InfluxDB server's pid, to count the CPU it spends (None: not measured).
    influx_pid: int | None = None

    def influx(self, database: str | None = None) -> InfluxClient:
        return InfluxClient(
            self.influx_url,
            database or self.influx_database,
            username=self.influx_auth.get("INFLUXDB_USERNAME"),
            password=self.influx_auth.get("INFLUXDB_PASSWORD"),
            token=self.influx_auth.get("INFLUXDB_TOKEN"),
            timeout_s=600,
        )


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _copy_raw(conn: psycopg.Connection, points: pl.DataFrame) -> None:
    frame = points.with_columns(pl.from_epoch("time", "ns"))
    with conn.cursor() as cur:
        copy_frame(cur, RAW_TABLE, frame, schema=None)


def load_dataset(
    influx: InfluxClient,
    conn: psycopg.Connection | None,
    fleet: pl.DataFrame,
    start: datetime,
    minutes: int,
    seed: int,
    say: Progress,
) -> dict[str, float]:
    """Write `minutes` of points at 1 Hz to InfluxDB (and the raw PG table when `conn` is given)."""
    influx.create_database()
    t0 = time.perf_counter()
    total = 0
    with ThreadPoolExecutor(max_workers=2) as pool:
        for i in range(minutes):
            minute = start + timedelta(minutes=i)
            points = generate_points(fleet, to_ns(minute), 60, seed=seed)
            if conn is not None:
                _copy_raw(conn, points)
            total += write_points(influx, points, MEASUREMENT, pool)
            if (i + 1) % 5 == 0 or i + 1 == minutes:
                say(f"  loaded {i + 1}/{minutes} minutes ({total:,} points, "
                    f"{total / (time.perf_counter() - t0):,.0f} points/s)")  # fmt: skip
    if conn is not None:
        conn.commit()
    seconds = time.perf_counter() - t0
    return {"points": total, "seconds": seconds, "points_per_s": total / seconds}


def wait_for_quiet_influx(influx: InfluxClient, limit_s: float = 600) -> float:
    """Wait until InfluxDB has compacted a freshly loaded dataset; returns the seconds waited.

    Measuring while it compacts 18M new points (both cores busy) made its own GROUP BY six times
    slower than at rest, which would flatter the pipeline.
    """
    t = time.perf_counter()
    quiet = 0
    while time.perf_counter() - t < limit_s and quiet < 3:
        quiet = quiet + 1 if influx.compactions_pending() == 0 else 0
        time.sleep(2)
    return time.perf_counter() - t


def _prepare_postgres(dsn: str, conn: psycopg.Connection, fleet: pl.DataFrame) -> None:
    from energy_pipeline.migrations import upgrade

    upgrade(dsn)
    upsert_devices(conn, fleet)
    with conn.transaction():
        conn.execute(f"DROP TABLE IF EXISTS {RAW_TABLE}")
        conn.execute(
            f"CREATE TABLE {RAW_TABLE} (time timestamptz NOT NULL, device_id text NOT NULL, "
            "household_id text NOT NULL, power_w float8, energy_wh float8, voltage_v float8)"
        )
        conn.execute("TRUNCATE energy.device_rollup_1m, energy.quarantine, energy.rollup_minutes")


def _index_raw(conn: psycopg.Connection) -> None:
    # The "before" gets the indexes a team would give a raw table serving these queries.
    with conn.transaction():
        conn.execute(f"CREATE INDEX ON {RAW_TABLE} (time)")
        conn.execute(f"CREATE INDEX ON {RAW_TABLE} (device_id, time)")
        conn.execute(f"CREATE INDEX ON {RAW_TABLE} (household_id, time)")
    conn.execute(f"ANALYZE {RAW_TABLE}")
    conn.execute("ANALYZE energy.device_rollup_1m")


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
    groupby = (
        "SELECT mean(power_w) AS power_w_avg, min(power_w) AS power_w_min, max(power_w) AS "
        "power_w_max, sum(energy_wh) AS energy_wh_sum, count(power_w) AS sample_count "
        f"FROM {quote_ident(MEASUREMENT)} WHERE time >= $start AND time < $end "
        "GROUP BY time(1m), device_id"
    )
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
            _copy_raw(conn, fresh)
        params = {"start": to_ns(s), "end": to_ns(e)}
        if i % 2:
            t = time.perf_counter()
            influx.query_frame(groupby, params)
            influx_s.append(time.perf_counter() - t)
        stats = process_window(influx, conn, MEASUREMENT, s, e, chunk_minutes=1)
        for k in stages:
            stages[k].append(stats.seconds[k])
        totals.append(sum(stats.seconds.values()))
        points.append(stats.points_read)
        if not i % 2:
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
        stats = process_window(influx, conn, MEASUREMENT, start, end, chunk)
        seconds = time.perf_counter() - t
        after = (_cpu_s(targets.influx_pid), _own_cpu_s(), _cpu_s(backend))
    names = ("influxdb", "pipeline", "postgres")
    cpu = {k: b - a for k, a, b in zip(names, before, after, strict=True)}
    # The reference: InfluxDB streaming the same range the same way, nothing done with it.
    influx_before, t = _cpu_s(targets.influx_pid), time.perf_counter()
    for window in chunk_windows(start, end, chunk):
        influx.read_points(MEASUREMENT, *window, parallel=2)
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


READ_QUERIES = {
    "household_5m_24h": (
        "SELECT date_bin('5 minutes', bucket, TIMESTAMPTZ '2000-01-01') AS b, sum(energy_wh_sum), "
        "max(power_w_max) FROM energy.device_rollup_1m WHERE household_id = %(h)s "
        "AND bucket >= %(s)s AND bucket < %(e)s GROUP BY 1 ORDER BY 1",
        f"SELECT date_bin('5 minutes', time, TIMESTAMPTZ '2000-01-01') AS b, sum(energy_wh), "
        f"max(power_w) FROM {RAW_TABLE} WHERE household_id = %(h)s "
        "AND time >= %(s)s AND time < %(e)s GROUP BY 1 ORDER BY 1",
    ),
    "device_1m_24h": (
        "SELECT bucket, power_w_avg, energy_wh_sum FROM energy.device_rollup_1m "
        "WHERE device_id = %(d)s AND bucket >= %(s)s AND bucket < %(e)s ORDER BY bucket",
        f"SELECT date_trunc('minute', time) AS b, avg(power_w), sum(energy_wh) FROM {RAW_TABLE} "
        "WHERE device_id = %(d)s AND time >= %(s)s AND time < %(e)s GROUP BY 1 ORDER BY 1",
    ),
    "top5_devices_24h": (
        "SELECT device_id, sum(energy_wh_sum) AS e FROM energy.device_rollup_1m "
        "WHERE household_id = %(h)s AND bucket >= %(s)s AND bucket < %(e)s "
        "GROUP BY 1 ORDER BY e DESC LIMIT 5",
        f"SELECT device_id, sum(energy_wh) AS e FROM {RAW_TABLE} WHERE household_id = %(h)s "
        "AND time >= %(s)s AND time < %(e)s GROUP BY 1 ORDER BY e DESC LIMIT 5",
    ),
}


def sample_households(fleet: pl.DataFrame, households: int, seed: int) -> pl.DataFrame:
    """The fleet rows of `households` households drawn with `seed` (all of them if fewer)."""
    every = fleet["household_id"].unique().sort().to_list()
    chosen = random.Random(seed).sample(every, min(households, len(every)))
    return fleet.filter(pl.col("household_id").is_in(chosen))


def load_read_history(
    conn: psycopg.Connection,
    sample: pl.DataFrame,
    start: datetime,
    end: datetime,
    seed: int,
    say: Progress,
) -> dict[str, float]:
    """Load [start, end) of the sampled devices into the raw table and, rolled up, the rollups.

    The rollups come from the pipeline's own roll-up; an hour at a time, so memory stays bounded.
    """
    t0 = time.perf_counter()
    devices = sample.select("device_id", "household_id")
    windows = chunk_windows(start, end, 60)
    points_total = 0
    for i, (s, e) in enumerate(windows):
        points = generate_points(sample, to_ns(s), int((e - s).total_seconds()), seed=seed)
        _copy_raw(conn, points)
        batch = roll_up_minutes(points, s, e, devices)
        replace_minutes(
            conn, s, e, batch.rollups, batch.quarantine, batch.ledger, computed_at=datetime.now(UTC)
        )
        points_total += points.height
        if (i + 1) % 4 == 0 or i + 1 == len(windows):
            say(f"  read history: {i + 1}/{len(windows)} hours ({points_total:,} points)")
    # The planner must see the new rows; the raw table's indexes already cover them.
    conn.execute(f"ANALYZE {RAW_TABLE}")
    conn.execute("ANALYZE energy.device_rollup_1m")
    return {"points": points_total, "seconds": time.perf_counter() - t0}


def _read_dataset(
    conn: psycopg.Connection, sample: pl.DataFrame, start: datetime, end: datetime
) -> dict[str, float]:
    """Rows the readers' queries can reach: the sampled devices' rows in [start, end)."""
    devices = sample["device_id"].to_list()
    counts = {}
    for key, table, column in (("raw", RAW_TABLE, "time"),
                               ("rollup", "energy.device_rollup_1m", "bucket")):  # fmt: skip
        row = conn.execute(
            f"SELECT count(*) FROM {table} WHERE device_id = ANY(%s) "
            f"AND {column} >= %s AND {column} < %s",
            (devices, start, end),
        ).fetchone()
        counts[key] = row[0] if row else 0
    size = conn.execute(
        "SELECT pg_total_relation_size(oid), reltuples FROM pg_class WHERE oid = %s::regclass",
        (RAW_TABLE,),
    ).fetchone()
    return {
        "raw_rows_in_window": counts["raw"],
        "rollup_rows_in_window": counts["rollup"],
        # Heap plus indexes per row, from the planner's row estimate after ANALYZE.
        "raw_table_bytes_per_row": size[0] / size[1] if size and size[1] > 0 else float("nan"),
    }


def _pgbench_script(
    conn: psycopg.Connection, query: str, sample: pl.DataFrame, window: tuple[datetime, datetime]
) -> str:
    """A pgbench script running `query` for a random sampled household or device each time."""
    households = sample["household_id"].unique().sort().to_list()
    devices = sample["device_id"].to_list()

    def pick(values: list[Any], var: str) -> str:
        items = ", ".join(sql.Literal(v).as_string(conn) for v in values)
        return f"(ARRAY[{items}])[:{var}]"

    params = {
        "h": pick(households, "h"),
        "d": pick(devices, "d"),
        "s": sql.Literal(window[0]).as_string(conn),
        "e": sql.Literal(window[1]).as_string(conn),
    }
    return (
        f"\\set h random(1, {len(households)})\n\\set d random(1, {len(devices)})\n"
        f"{query % params};\n"
    )


def _readers(
    dsn: str,
    which: int,
    sample: pl.DataFrame,
    window: tuple[datetime, datetime],
    readers: int,
    seconds: float,
    seed: int,
) -> dict[str, Any]:
    """`readers` concurrent pgbench clients for `seconds`, each query type equally likely.

    pgbench (C, in its own process) is the load: Python threads sharing one interpreter lock
    queued behind each other and halved the queries/s PostgreSQL could serve, which is a limit
    of the client, not of the tables. Latencies come from pgbench's per-query log.
    """
    pgbench = str(LocalPostgres.bin_dir() / "pgbench")
    names = list(READ_QUERIES)
    with tempfile.TemporaryDirectory(prefix="bench-readers-") as tmp, psycopg.connect(dsn) as conn:
        args = [pgbench, "--no-vacuum", "--client", str(readers),
                "--jobs", str(min(readers, os.cpu_count() or 1)), "--time", str(round(seconds)),
                "--protocol", "prepared", "--random-seed", str(seed),
                "--log", "--log-prefix", f"{tmp}/latency"]  # fmt: skip
        for k, name in enumerate(names):
            script = Path(tmp) / f"{k}.sql"
            script.write_text(_pgbench_script(conn, READ_QUERIES[name][which], sample, window))
            args += ["--file", str(script)]
        done = subprocess.run([*args, dsn], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"pgbench failed: {done.stderr.strip()[-500:]}")
        latencies: dict[str, list[float]] = {name: [] for name in names}
        for log in Path(tmp).glob("latency.*"):
            # client, transaction, latency (us), script, epoch (s), epoch (us)
            for line in log.read_text().splitlines():
                fields = line.split()
                latencies[names[int(fields[3])]].append(int(fields[2]) / 1000)
    every = [v for vs in latencies.values() for v in vs]
    return {
        "queries": len(every),
        "qps": len(every) / seconds,
        "p50_ms": _pct(every, 0.5),
        "p95_ms": _pct(every, 0.95),
        "p99_ms": _pct(every, 0.99),
        "by_query": {
            k: {"queries": len(v), "p50_ms": _pct(v, 0.5), "p95_ms": _pct(v, 0.95)}
            for k, v in latencies.items()
        },
    }


def measure_reads(
    targets: BenchTargets,
    fleet: pl.DataFrame,
    start: datetime,
    span: int,
    opts: BenchOptions,
    say: Progress,
) -> dict[str, Any]:
    """Concurrent BI-style readers on rollups, then on the raw table, while the pipeline writes.

    The readers ask about a seeded sample of households over the `opts.read_hours` ending where
    the bench history ([start, start + span), all devices) ends. The sampled devices first get
    the rest of that window, in both tables, so every query covers the whole window; the other
    devices keep only the history.
    """
    end = start + timedelta(minutes=span)
    window = (end - timedelta(hours=opts.read_hours), end)
    sample = sample_households(fleet, opts.read_households, opts.seed)
    with connect(targets.pg_dsn) as conn:
        households = sample["household_id"].n_unique()
        say(f"  loading {opts.read_hours} h for {households} sampled households "
            f"({sample.height} devices) into both tables")  # fmt: skip
        loaded = load_read_history(conn, sample, window[0], min(window[1], start), opts.seed, say)
        dataset = {
            "households": households,
            "devices": sample.height,
            "hours": opts.read_hours,
            "window_start": window[0].isoformat(),
            "window_end": window[1].isoformat(),
            "all_devices_minutes": span,
            "points_loaded": loaded["points"],
            "load_s": loaded["seconds"],
            **_read_dataset(conn, sample, *window),
            "coverage": f"both tables hold the whole {opts.read_hours} h window only for the "
            f"{sample.height} sampled devices; the other devices have its last {span} minutes",
        }
    stop = threading.Event()
    rewrites = {"windows": 0}

    def writer() -> None:
        with connect(targets.pg_dsn) as conn:
            i = 0
            while not stop.is_set():
                s = start + timedelta(minutes=i % span)
                process_window(targets.influx(), conn, MEASUREMENT, s, s + timedelta(minutes=1), 1)
                rewrites["windows"] += 1
                i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        args = (sample, window, opts.readers, opts.read_seconds, opts.seed)
        rollup = _readers(targets.pg_dsn, 0, *args)
        raw = _readers(targets.pg_dsn, 1, *args)
    finally:
        stop.set()
        thread.join()
    # One reader on an idle machine: what a query costs without waiting behind 31 others.
    alone = (sample, window, 1, min(opts.read_seconds, 15.0), opts.seed)
    single = {"rollup": _readers(targets.pg_dsn, 0, *alone),
              "raw": _readers(targets.pg_dsn, 1, *alone)}  # fmt: skip
    return {
        "readers": opts.readers,
        "seconds_each": opts.read_seconds,
        "dataset": dataset,
        "minutes_rewritten_meanwhile": rewrites["windows"],
        "rollup": rollup,
        "raw": raw,
        "p95_speedup": raw["p95_ms"] / rollup["p95_ms"],
        "p95_speedup_by_query": {
            k: raw["by_query"][k]["p95_ms"] / rollup["by_query"][k]["p95_ms"] for k in READ_QUERIES
        },
        "single_reader": {
            table: {k: v["p50_ms"] for k, v in single[table]["by_query"].items()}
            for table in single
        },
    }


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
        load_dataset(influx, None, fleet, minute, 2, opts.seed, lambda _m: None)
        databases[n] = (influx, minute)
    for influx, _ in databases.values():
        wait_for_quiet_influx(influx)
    seconds: dict[int, list[float]] = {n: [] for n in opts.scaling}
    points: dict[int, int] = {}
    for i in range(SCALING_RUNS + 1):
        for n, (influx, minute) in databases.items():
            s = minute + timedelta(minutes=i % 2)
            stats = process_window(influx, conn, MEASUREMENT, s, s + timedelta(minutes=1), 1)
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


def _dagster_run_timings(dagster_dsn: str, since: float) -> list[dict[str, float]]:
    """Sensor-launched single-minute runs: seconds from minute close to request, start, success."""
    with psycopg.connect(dagster_dsn) as conn:
        rows = conn.execute(
            "SELECT p.value, extract(epoch FROM r.create_timestamp AT TIME ZONE 'UTC'), "
            "r.start_time, r.end_time FROM runs r "
            "JOIN run_tags o ON o.run_id = r.run_id AND o.key = 'energy/origin' "
            "AND o.value = 'minutes' "
            "JOIN run_tags p ON p.run_id = r.run_id AND p.key = 'dagster/partition' "
            "WHERE r.status = 'SUCCESS' AND r.start_time >= %s",
            (since,),
        ).fetchall()
    out = []
    for key, created, started, ended in rows:
        closed = datetime.strptime(key, "%Y-%m-%d-%H:%M").replace(tzinfo=UTC).timestamp() + 60
        out.append({"wait_for_sensor_s": float(created) - closed,
                    "launch_s": started - float(created), "run_s": ended - started,
                    "close_to_success_s": ended - closed})  # fmt: skip
    return out


def measure_live(
    targets: BenchTargets,
    live_pg_dsn: str,
    dagster_dsn: str,
    opts: BenchOptions,
    minutes: float,
    say: Progress,
) -> dict[str, Any]:
    """Simulator writing live + the real Dagster daemon: freshness lag and per-run overhead.

    Uses its own InfluxDB and PostgreSQL databases, so the loaded history is not touched.
    """
    import shutil
    import sys

    from energy_pipeline.config import PROJECT_ROOT, Settings, dagster_storage_url
    from energy_pipeline.telemetry_writer import SimulationOptions, run_live

    live_db = f"{targets.influx_database}_live"
    influx = targets.influx(live_db)
    # A clean slate: points left by an earlier run, or a sensor cursor kept in Dagster's storage,
    # would have the daemon catching up old minutes instead of following the live ones.
    influx.query_json(f"DROP DATABASE {quote_ident(live_db)}")
    influx.create_database()
    with psycopg.connect(dagster_dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS public CASCADE")
        conn.execute("CREATE SCHEMA public")
    settings = Settings.from_env({"INFLUXDB_DATABASE": live_db, "ENERGY_PG_DSN": live_pg_dsn})
    settings = dataclasses_replace(settings, influx_url=targets.influx_url)
    with connect(live_pg_dsn) as conn:
        _prepare_postgres(live_pg_dsn, conn, build_fleet(opts.devices, seed=opts.seed))
    home = Path(tempfile.mkdtemp(prefix="bench-dagster-"))
    shutil.copy(PROJECT_ROOT / "dagster.yaml", home / "dagster.yaml")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "DAGSTER_PG_URL": dagster_storage_url(dagster_dsn),
        "INFLUXDB_URL": targets.influx_url,
        "INFLUXDB_DATABASE": live_db,
        "ENERGY_PG_DSN": live_pg_dsn,
    }
    stop = threading.Event()
    writer = threading.Thread(
        target=run_live,
        args=(influx, settings, SimulationOptions(opts.devices, opts.seed, register=False)),
        kwargs={"stop": stop},
    )
    began = time.time()
    writer.start()
    log = open(home / "daemon.log", "wb")  # noqa: SIM115 - closed below
    daemon = subprocess.Popen(
        [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", "workspace.yaml"],
        cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    lags: list[float] = []
    full = opts.devices * 60 * 0.99
    try:
        warmup = began + 120  # the first minute is partial; the first run imports everything
        while time.time() < began + minutes * 60:
            time.sleep(5)
            with psycopg.connect(live_pg_dsn) as conn:
                row = conn.execute(
                    "SELECT max(bucket) FROM energy.rollup_minutes WHERE points_read >= %s",
                    (full,),
                ).fetchone()
            newest = row[0] if row else None
            if newest is not None and time.time() >= warmup:
                lags.append(time.time() - (newest.timestamp() + 60))
            elapsed = (time.time() - began) / 60
            if int(elapsed * 12) % 12 == 0:
                say(f"  live {elapsed:.1f}/{minutes} min, freshness lag now "
                    f"{lags[-1] if lags else float('nan'):.1f} s")  # fmt: skip
    finally:
        stop.set()
        daemon.send_signal(2)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
        log.close()
        writer.join(timeout=30)
    runs = _dagster_run_timings(dagster_dsn, began + 120)

    def stat(key: str, q: float) -> float:
        return _pct([r[key] for r in runs], q)

    return {
        "minutes": minutes,
        "freshness_samples": len(lags),
        "freshness_lag_p50_s": _pct(lags, 0.5),
        "freshness_lag_p95_s": _pct(lags, 0.95),
        "freshness_lag_max_s": max(lags) if lags else float("nan"),
        "sensor_runs": len(runs),
        "close_to_success_p50_s": stat("close_to_success_s", 0.5),
        "close_to_success_p95_s": stat("close_to_success_s", 0.95),
        # Had every minute been rolled up as fast as the fastest run, "now - end of the newest
        # complete minute" would still climb for 60 s before the next one lands: its p95 can be no
        # lower than this.
        "freshness_lag_p95_floor_s": stat("close_to_success_s", 0.0) + 0.95 * 60,
        "wait_for_sensor_p50_s": stat("wait_for_sensor_s", 0.5),
        "launch_p50_s": stat("launch_s", 0.5),
        "run_p50_s": stat("run_s", 0.5),
    }


def run_bench(
    targets: BenchTargets,
    opts: BenchOptions,
    say: Progress,
    live_minutes: float = 0,
    live_dsns: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Run every measurement; returns the figures (also what `--json` writes).

    `live_dsns` (rollup database, Dagster storage database) enables the live section.
    """
    fleet = build_fleet(opts.devices, seed=opts.seed)
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    span = max(opts.minutes, opts.long_minutes)
    # History fills [start, start + span); fresh minutes follow it and still end in the past.
    start = now - timedelta(minutes=span + opts.minutes + 2)
    result: dict[str, Any] = {"options": asdict(opts), "started_at": datetime.now(UTC).isoformat()}
    with connect(targets.pg_dsn) as conn:
        conn.autocommit = False
        say(f"preparing PostgreSQL and loading {span} minutes x {opts.devices} devices at 1 Hz")
        _prepare_postgres(targets.pg_dsn, conn, fleet)
        conn.commit()
        result["load"] = load_dataset(targets.influx(), conn, fleet, start, span, opts.seed, say)
        say("indexing the raw PostgreSQL table")
        _index_raw(conn)
        conn.commit()
        say("waiting for InfluxDB to finish compacting the new data")
        result["influx_quiesce_s"] = wait_for_quiet_influx(targets.influx())
        conn.autocommit = True
        say(
            f"measuring {opts.minutes} fresh minutes (written just before), pipeline and references"
        )
        fresh_start = start + timedelta(minutes=span)
        result["one_minute"] = measure_minutes(
            targets, conn, fresh_start, opts.minutes, fresh_fleet=fleet, seed=opts.seed
        )
        say(f"measuring {opts.minutes} minutes of compacted history, pipeline and references")
        result["one_minute_history"] = measure_minutes(targets, conn, start, opts.minutes)
        if opts.long_minutes:
            say(f"measuring a {opts.long_minutes}-minute ranged run in a child process")
            result["ranged"] = measure_ranged(targets, start, opts.long_minutes, opts.chunk_minutes)
        else:
            result["ranged"] = None
        say(f"measuring {opts.readers} concurrent readers, {opts.read_seconds:.0f} s per table")
        result["reads"] = measure_reads(targets, fleet, start, span, opts, say)
        say("measuring cost per point at " + ", ".join(map(str, opts.scaling)) + " devices")
        result["scaling"] = measure_scaling(targets, conn, start, opts, say)
        costs = [r["us_per_point"] for r in result["scaling"]]
        result["scaling_spread"] = max(costs) / min(costs)
        mean_cost = statistics.fmean(costs)
        result["scaling_max_deviation"] = max(abs(c / mean_cost - 1) for c in costs)
    if live_minutes and live_dsns:
        say(f"live for {live_minutes} minutes: simulator + Dagster daemon")
        result["live"] = measure_live(targets, *live_dsns, opts, live_minutes, say)
    return result


def format_table(r: dict[str, Any]) -> str:
    """The figures as a plain-text table."""
    m, rd = r["options"], r["reads"]
    rows: list[tuple[str, str]] = [
        ("load: points written (InfluxDB and raw PG table)", f"{r['load']['points']:,}"),
        ("load: points/s", f"{r['load']['points_per_s']:,.0f}"),
        ("wait for InfluxDB compactions after load (s)", f"{r['influx_quiesce_s']:.0f}"),
    ]
    for key, label in (("one_minute", "fresh minute"), ("one_minute_history", "history minute")):
        o = r[key]
        rows += [
            (f"{label}: points", f"{o['points_per_minute']:,}"),
            *((f"{label}: {k} (s, median)", f"{v:.3f}") for k, v in o["stages_s"].items()),
            (f"{label}: in-asset total (s, median)", f"{o['in_asset_s']:.3f}"),
            (f"{label}: in-asset total (s, worst)", f"{o['in_asset_max_s']:.3f}"),
            (f"{label}: points/s", f"{o['points_per_s']:,.0f}"),
            (f"{label}: InfluxDB GROUP BY time(1m), device_id (s)", f"{o['influx_groupby_s']:.3f}"),
            (f"{label}:   pipeline / InfluxDB (< 1: pipeline faster)", f"{o['influx_ratio']:.2f}"),
            (f"{label}: PostgreSQL raw-table GROUP BY (s)", f"{o['pg_raw_groupby_s']:.3f}"),
            (f"{label}:   pipeline / PostgreSQL raw", f"{o['pg_raw_ratio']:.2f}"),
        ]
    if r.get("ranged"):
        g = r["ranged"]
        rows += [
            (f"ranged run of {g['minutes']} minutes: total (s)", f"{g['seconds']:.2f}"),
            ("ranged run: points/s", f"{g['points_per_s']:,.0f}"),
            ("ranged run: peak RSS of its process (MiB)", f"{g['peak_rss_mib']:.0f}"),
            *((f"ranged run: CPU s, {k}", f"{v:.1f}") for k, v in g["cpu_s"].items()),
            (f"ranged run: CPU floor, all CPU s / {g['cores']} cores (s)",
             f"{g['cpu_floor_s']:.1f}"),
            ("same range only read from InfluxDB (s)", f"{g['read_only_s']:.2f}"),
            ("  InfluxDB CPU s for that read", f"{g['read_only_influxdb_cpu_s']:.1f}"),
        ]  # fmt: skip
    ds = rd["dataset"]
    rows += [
        ("reads: sampled households / devices", f"{ds['households']} / {ds['devices']}"),
        (f"reads: window (h) / of it, all {m['devices']} devices (min)",
         f"{ds['hours']} / {ds['all_devices_minutes']}"),
        ("reads: raw rows in window, sampled devices", f"{ds['raw_rows_in_window']:,}"),
        ("reads: rollup rows in window, sampled devices", f"{ds['rollup_rows_in_window']:,}"),
        ("reads: raw table bytes per row (heap + indexes)", f"{ds['raw_table_bytes_per_row']:.0f}"),
    ]  # fmt: skip
    for table in ("rollup", "raw"):
        t = rd[table]
        rows += [
            (f"reads on {table}, {rd['readers']} readers: p50/p95/p99 (ms)",
             f"{t['p50_ms']:.1f}/{t['p95_ms']:.1f}/{t['p99_ms']:.1f}"),
            (f"reads on {table}: queries/s", f"{t['qps']:,.1f}"),
        ]  # fmt: skip
    for name, ratio in rd["p95_speedup_by_query"].items():
        for table in ("rollup", "raw"):
            q = rd[table]["by_query"][name]
            rows.append(
                (f"reads {name}: {table} p50/p95 (ms)", f"{q['p50_ms']:.1f}/{q['p95_ms']:.1f}")
            )
        rows.append((f"reads {name}: raw p95 / rollup p95", f"{ratio:.1f}"))
    rows.append(("reads: raw p95 / rollup p95, all queries", f"{rd['p95_speedup']:.1f}"))
    for name in rd["single_reader"]["rollup"]:
        one = rd["single_reader"]
        rows.append((f"reads {name}, 1 reader, idle: rollup / raw p50 (ms)",
                     f"{one['rollup'][name]:.1f} / {one['raw'][name]:.1f}"))  # fmt: skip
    rows += [
        (f"scaling {x['devices']} devices: us/point (s/minute)",
         f"{x['us_per_point']:.2f} ({x['in_asset_s']:.3f})")
        for x in r["scaling"]
    ]  # fmt: skip
    rows.append(("scaling: max/min cost per point", f"{r['scaling_spread']:.2f}"))
    rows.append(("scaling: largest deviation from the mean cost per point",
                 f"{r['scaling_max_deviation']:.0%}"))  # fmt: skip
    for k, v in (r.get("live") or {}).items():
        if isinstance(v, int | float):
            rows.append((f"live: {k}", f"{v:.2f}"))
    header = f"energy-pipeline bench: {m['devices']} devices at 1 Hz, seed {m['seed']}"
    width = max(len(label) for label, _ in rows)
    body = [f"{label:<{width}}  {value:>16}" for label, value in rows]
    return "\n".join([header, f"{'measure':<{width}}  {'value':>16}", *body])
