"""BI-style readers (pgbench) on the rollups and on the raw table, over a 24-hour sample."""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import psycopg
from psycopg import sql

from energy_pipeline.devtools.bench.common import (
    RAW_TABLE,
    BenchOptions,
    BenchTargets,
    Progress,
    copy_raw,
    pct,
    raw_source,
)
from energy_pipeline.devtools.services import LocalPostgres
from energy_pipeline.devtools.simulator import generate_points
from energy_pipeline.hierarchy import replace_device_1h, replace_household_5m
from energy_pipeline.influx import to_ns
from energy_pipeline.ingest import chunk_windows, process_window
from energy_pipeline.rollups import roll_up_minutes
from energy_pipeline.storage import connect, replace_minutes

# Each query's answer from the rollup table it is meant for, then the same answer from raw points.
READ_QUERIES = {
    "household_5m_24h": (
        "SELECT bucket, energy_wh_sum, power_w_avg, power_w_peak FROM energy.household_rollup_5m "
        "WHERE household_id = %(h)s AND bucket >= %(s)s AND bucket < %(e)s ORDER BY bucket",
        # Household draw = the sum of its devices' mean power per minute, averaged and peaked
        # over 5 minutes: what household_rollup_5m holds.
        "WITH m AS (SELECT device_id, date_trunc('minute', time) AS minute, avg(power_w) AS p, "
        f"sum(energy_wh) AS e FROM {RAW_TABLE} WHERE household_id = %(h)s "
        "AND time >= %(s)s AND time < %(e)s GROUP BY 1, 2), "
        "d AS (SELECT minute, sum(p) AS draw, sum(e) AS e FROM m GROUP BY 1) "
        "SELECT date_bin('5 minutes', minute, TIMESTAMPTZ '2000-01-01') AS b, sum(e), "
        "avg(draw), max(draw) FROM d GROUP BY 1 ORDER BY 1",
    ),
    "top5_devices_24h": (
        "SELECT device_id, sum(energy_wh_sum) AS e FROM energy.device_rollup_1h "
        "WHERE household_id = %(h)s AND bucket >= %(s)s AND bucket < %(e)s "
        "GROUP BY 1 ORDER BY e DESC LIMIT 5",
        f"SELECT device_id, sum(energy_wh) AS e FROM {RAW_TABLE} WHERE household_id = %(h)s "
        "AND time >= %(s)s AND time < %(e)s GROUP BY 1 ORDER BY e DESC LIMIT 5",
    ),
    "device_1m_24h": (
        "SELECT bucket, power_w_avg, energy_wh_sum FROM energy.device_rollup_1m "
        "WHERE device_id = %(d)s AND bucket >= %(s)s AND bucket < %(e)s ORDER BY bucket",
        f"SELECT date_trunc('minute', time) AS b, avg(power_w), sum(energy_wh) FROM {RAW_TABLE} "
        "WHERE device_id = %(d)s AND time >= %(s)s AND time < %(e)s GROUP BY 1 ORDER BY 1",
    ),
}
# The table each rollup query reads.
READ_TABLES = {
    "household_5m_24h": "energy.household_rollup_5m",
    "top5_devices_24h": "energy.device_rollup_1h",
    "device_1m_24h": "energy.device_rollup_1m",
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
        copy_raw(conn, points)
        batch = roll_up_minutes(points, s, e, devices)
        replace_minutes(
            conn, s, e, batch.rollups, batch.quarantine, batch.ledger, computed_at=datetime.now(UTC)
        )
        points_total += points.height
        if (i + 1) % 4 == 0 or i + 1 == len(windows):
            say(f"  read history: {i + 1}/{len(windows)} hours ({points_total:,} points)")
    # The planner must see the new rows, and index-only scans need the visibility map. The
    # rollup partitions are autovacuumed every 1,000 new rows (migration 0011), so in production
    # at most the last minute's rows lack it; the bench wrote a day just now.
    conn.execute(f"VACUUM (ANALYZE) {RAW_TABLE}")
    conn.execute("VACUUM (ANALYZE) energy.device_rollup_1m")
    return {"points": points_total, "seconds": time.perf_counter() - t0}


def fill_hierarchy(conn: psycopg.Connection, start: datetime, end: datetime) -> dict[str, float]:
    """Roll the minute rows of [start, end) (whole hours) up into both coarse tables, as the
    hierarchy's assets do; a day at a time, so each transaction stays short."""
    t0 = time.perf_counter()
    rows = {"household_5m_rows": 0, "device_1h_rows": 0}
    day = timedelta(days=1)
    s = start
    while s < end:
        e = min(s + day, end)
        computed_at = datetime.now(UTC)
        rows["household_5m_rows"] += replace_household_5m(conn, s, e, computed_at).rows_written
        rows["device_1h_rows"] += replace_device_1h(conn, s, e, computed_at).rows_written
        s = e
    conn.execute("VACUUM (ANALYZE) energy.household_rollup_5m")
    conn.execute("VACUUM (ANALYZE) energy.device_rollup_1h")
    return {**rows, "seconds": time.perf_counter() - t0}


def rewrite_coarse(conn: psycopg.Connection, minute: datetime) -> int:
    """Recompute the coarse windows a rewritten minute completes, as the hierarchy sensor would
    request them; returns how many windows were written."""
    after = minute + timedelta(minutes=1)
    written = 0
    if after.minute % 5 == 0:
        replace_household_5m(conn, after - timedelta(minutes=5), after, datetime.now(UTC))
        written += 1
    if after.minute == 0:
        replace_device_1h(conn, after - timedelta(hours=1), after, datetime.now(UTC))
        written += 1
    return written


def _read_dataset(
    conn: psycopg.Connection, sample: pl.DataFrame, start: datetime, end: datetime
) -> dict[str, float]:
    """Rows the readers' queries can reach: the sampled devices' rows in [start, end)."""
    devices = sample["device_id"].to_list()
    households = sample["household_id"].unique().to_list()
    counts = {}
    for key, table, column, who, ids in (
        ("raw", RAW_TABLE, "time", "device_id", devices),
        ("rollup", "energy.device_rollup_1m", "bucket", "device_id", devices),
        ("household_5m", "energy.household_rollup_5m", "bucket", "household_id", households),
        ("device_1h", "energy.device_rollup_1h", "bucket", "device_id", devices),
    ):
        row = conn.execute(
            f"SELECT count(*) FROM {table} WHERE {who} = ANY(%s) "
            f"AND {column} >= %s AND {column} < %s",
            (ids, start, end),
        ).fetchone()
        counts[key] = row[0] if row else 0
    size = conn.execute(
        "SELECT pg_total_relation_size(oid), reltuples FROM pg_class WHERE oid = %s::regclass",
        (RAW_TABLE,),
    ).fetchone()
    return {
        "raw_rows_in_window": counts["raw"],
        "rollup_rows_in_window": counts["rollup"],
        "household_5m_rows_in_window": counts["household_5m"],
        "device_1h_rows_in_window": counts["device_1h"],
        # Heap plus indexes per row, from the planner's row estimate after ANALYZE.
        "raw_table_bytes_per_row": size[0] / size[1] if size and size[1] > 0 else float("nan"),
    }


def _pgbench_script(
    conn: psycopg.Connection, query: str, sample: pl.DataFrame, window: tuple[datetime, datetime]
) -> str:
    """A pgbench script running `query` for a random sampled household or device each time."""
    households = sample["household_id"].unique().sort().to_list()
    devices = sample["device_id"].to_list()

    # pgbench scripts take no bound parameters but its own random variables, so the sample goes
    # into the SQL text, each value quoted by psycopg.
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
    only: str | None = None,
    rate: float | None = None,
) -> dict[str, Any]:
    """`readers` concurrent pgbench clients for `seconds`, each query type equally likely (or
    only the query `only`).

    Without `rate` each client sends its next query as soon as the last one is answered (closed
    loop: the queries/s are what the server can serve). With `rate` the clients together send
    `rate` queries/s on a Poisson schedule (open loop), and a latency counts from the query's
    scheduled start, so time spent queued behind the others is in it.

    pgbench (C, in its own process) is the load: Python threads sharing one interpreter lock
    queued behind each other and halved the queries/s PostgreSQL could serve, which is a limit
    of the client, not of the tables. Latencies come from pgbench's per-query log.
    """
    pgbench = str(LocalPostgres.bin_dir() / "pgbench")
    names = [only] if only else list(READ_QUERIES)
    with tempfile.TemporaryDirectory(prefix="bench-readers-") as tmp, psycopg.connect(dsn) as conn:
        args = [pgbench, "--no-vacuum", "--client", str(readers),
                "--jobs", str(min(readers, os.cpu_count() or 1)), "--time", str(round(seconds)),
                "--protocol", "prepared", "--random-seed", str(seed),
                "--log", "--log-prefix", f"{tmp}/latency"]  # fmt: skip
        if rate:
            args += ["--rate", f"{rate:.1f}"]
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
        "p50_ms": pct(every, 0.5),
        "p95_ms": pct(every, 0.95),
        "p99_ms": pct(every, 0.99),
        "by_query": {
            k: {"queries": len(v), "p50_ms": pct(v, 0.5), "p95_ms": pct(v, 0.95)}
            for k, v in latencies.items()
        },
    }


PROTOCOLS = ("simple", "extended", "prepared")


def device_day_capacity(
    dsn: str,
    sample: pl.DataFrame,
    window: tuple[datetime, datetime],
    readers: int,
    seconds: float,
    seed: int,
) -> dict[str, Any]:
    """Latency of the one-device day against demand, the other queries idle.

    Closed loop at a quarter, half and all of `readers`, then `readers` clients in open loop at
    a quarter, half and three quarters of what the closed loop at full count served: BI readers
    pause between queries, and the open loop shows the latency at a given demand rather than
    at the server's limit.
    """
    name = "device_1m_24h"
    args = (sample, window)
    closed = []
    for n in sorted({max(1, readers // 4), max(1, readers // 2), readers}):
        q = _readers(dsn, 0, *args, n, seconds, seed, only=name)
        closed.append({"readers": n, "qps": q["qps"], "p50_ms": q["p50_ms"],
                       "p95_ms": q["p95_ms"]})  # fmt: skip
    served = closed[-1]["qps"]
    open_loop = []
    for share in (0.25, 0.5, 0.75):
        q = _readers(dsn, 0, *args, readers, seconds, seed, only=name, rate=served * share)
        open_loop.append({"readers": readers, "share_of_max": share, "demand_qps": served * share,
                          "qps": q["qps"], "p50_ms": q["p50_ms"],
                          "p95_ms": q["p95_ms"]})  # fmt: skip
    return {"query": name, "closed_loop": closed, "open_loop": open_loop}


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds a local process has used so far (None: not readable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_per_query(
    dsn: str,
    query: str,
    sample: pl.DataFrame,
    window: tuple[datetime, datetime],
    protocol: str,
    seconds: float,
    seed: int,
) -> dict[str, Any]:
    """One pgbench client running `query` over `protocol`: CPU per query of its PostgreSQL backend
    (from /proc, over the middle of the run) and of pgbench itself.

    CPU time barely depends on what else runs on the machine, unlike latency, so it compares
    query shapes and protocols on a shared host. The server must be local (the bench's is).
    """
    pgbench = str(LocalPostgres.bin_dir() / "pgbench")
    tag = f"bench-cpu-{os.getpid()}-{protocol}"
    seconds = max(round(seconds), 3)
    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp, psycopg.connect(dsn) as conn:
        conn.autocommit = True
        script = Path(tmp) / "q.sql"
        script.write_text(_pgbench_script(conn, query, sample, window))
        args = [pgbench, "--no-vacuum", "--client", "1", "--time", str(seconds),
                "--protocol", protocol, "--random-seed", str(seed), "--file", str(script),
                "--log", "--log-prefix", f"{tmp}/latency", dsn]  # fmt: skip
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.Popen(
            args,
            env={**os.environ, "PGAPPNAME": tag},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        pid = None
        started = time.monotonic()
        while pid is None and time.monotonic() - started < 5 and proc.poll() is None:
            row = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (tag,)
            ).fetchone()
            pid = row[0] if row else None
            if pid is None:
                time.sleep(0.05)
        # The middle of the run: connecting and the first, custom-planned executions excluded.
        time.sleep(0.5)
        t0, c0 = time.time(), _cpu_s(pid) if pid else None
        time.sleep(max(seconds - 1.5, 1.0))
        t1, c1 = time.time(), _cpu_s(pid) if pid else None
        _, err = proc.communicate()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise RuntimeError(f"pgbench failed: {err.decode(errors='replace').strip()[-500:]}")
        stamps = [
            int(f[4]) + int(f[5]) / 1e6
            for log in Path(tmp).glob("latency.*")
            for f in (line.split() for line in log.read_text().splitlines())
        ]
    in_window = sum(t0 <= t < t1 for t in stamps)
    client_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    backend = (
        (c1 - c0) / in_window * 1000 if c0 is not None and c1 is not None and in_window else None
    )
    return {
        "queries": len(stamps),
        "qps": len(stamps) / seconds,
        "backend_cpu_ms": backend,
        "pgbench_cpu_ms": client_s / len(stamps) * 1000 if stamps else None,
    }


def _binary_cpu_per_query(
    dsn: str,
    query: str,
    sample: pl.DataFrame,
    window: tuple[datetime, datetime],
    seconds: float,
    seed: int,
) -> dict[str, Any]:
    """CPU per query of the backend when the client prepares `query` once and asks for binary
    results, as pgx (Grafana) does by default and pgjdbc (Metabase) does once a statement is
    server-prepared; pgbench can only ask for text.

    The window is written into the SQL text as in the pgbench scripts, the household or device
    is bound.
    """
    rng = random.Random(seed)
    households = sample["household_id"].unique().sort().to_list()
    devices = sample["device_id"].to_list()
    with psycopg.connect(dsn, autocommit=True) as conn:
        text = query % {
            "h": "%(h)s",
            "d": "%(d)s",
            "s": sql.Literal(window[0]).as_string(conn),
            "e": sql.Literal(window[1]).as_string(conn),
        }
        pid = conn.info.backend_pid

        def one() -> None:
            params = {"h": rng.choice(households), "d": rng.choice(devices)}
            conn.cursor(binary=True).execute(text, params, prepare=True).fetchall()

        for _ in range(20):  # past the custom plans the plan cache starts with
            one()
        c0, t0, n = _cpu_s(pid), time.monotonic(), 0
        while time.monotonic() - t0 < seconds:
            one()
            n += 1
        c1 = _cpu_s(pid)
    backend = (c1 - c0) / n * 1000 if c0 is not None and c1 is not None and n else None
    return {"queries": n, "backend_cpu_ms": backend}


def explain_device_day(
    conn: psycopg.Connection, device_id: str, window: tuple[datetime, datetime]
) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) of the one-device-day query: the partitions it scans, how, and
    how many heap pages the index-only scans still had to visit."""
    query = READ_QUERIES["device_1m_24h"][0]
    row = conn.execute(
        f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {query}",
        {"d": device_id, "s": window[0], "e": window[1]},
    ).fetchone()
    doc = row[0] if row else [{}]
    plan = (json.loads(doc) if isinstance(doc, str) else doc)[0]
    scans: list[dict[str, Any]] = []

    def walk(node: dict[str, Any]) -> None:
        if "Relation Name" in node:
            scans.append(node)
        for child in node.get("Plans", []):
            walk(child)

    walk(plan["Plan"])
    return {
        "top_node": plan["Plan"]["Node Type"],
        "partitions_scanned": len(scans),
        "scan_types": sorted({n["Node Type"] for n in scans}),
        "heap_fetches": sum(n.get("Heap Fetches", 0) for n in scans),
        "shared_buffers_touched": plan["Plan"].get("Shared Hit Blocks", 0)
        + plan["Plan"].get("Shared Read Blocks", 0),
        "rows": plan["Plan"].get("Actual Rows"),
        "planning_ms": plan.get("Planning Time"),
        "execution_ms": plan.get("Execution Time"),
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
        say("  rolling the window's minute rows up into household_rollup_5m and device_rollup_1h")
        coarse = fill_hierarchy(conn, *window)
        dataset = {
            "households": households,
            "devices": sample.height,
            "hours": opts.read_hours,
            "window_start": window[0].isoformat(),
            "window_end": window[1].isoformat(),
            "all_devices_minutes": span,
            "points_loaded": loaded["points"],
            "load_s": loaded["seconds"],
            "hierarchy_fill_s": coarse["seconds"],
            **_read_dataset(conn, sample, *window),
            "coverage": f"both tables hold the whole {opts.read_hours} h window only for the "
            f"{sample.height} sampled devices; the other devices have its last {span} minutes",
        }
    stop = threading.Event()
    rewrites = {"windows": 0, "coarse_windows": 0}

    def writer() -> None:
        influx = targets.influx()
        with connect(targets.pg_dsn) as conn:
            i = 0
            while not stop.is_set():
                began = time.monotonic()
                s = start + timedelta(minutes=i % span)
                process_window(
                    raw_source(influx),
                    conn,
                    s,
                    s + timedelta(minutes=1),
                    1,
                )
                rewrites["windows"] += 1
                rewrites["coarse_windows"] += rewrite_coarse(conn, s)
                i += 1
                # Paced: one minute of the whole fleet per `writer_pace_s`, as the live pipeline
                # writes at peak (60 s); 0: back to back, a catch-up after downtime.
                stop.wait(max(0.0, opts.writer_pace_s - (time.monotonic() - began)))

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        args = (sample, window, opts.readers, opts.read_seconds, opts.seed)
        rollup = _readers(targets.pg_dsn, 0, *args)
        raw = _readers(targets.pg_dsn, 1, *args)
        # Each rollup query on its own at the same concurrency: the mix above makes the cheap
        # queries wait behind the 1,440-row one.
        alone_at_n = {
            name: _readers(targets.pg_dsn, 0, *args, only=name)["by_query"][name]
            for name in READ_QUERIES
        }
        capacity = device_day_capacity(
            targets.pg_dsn, sample, window, opts.readers, min(opts.read_seconds, 30.0), opts.seed
        )
    finally:
        stop.set()
        thread.join()
    # One reader on an idle machine: what a query costs without waiting behind 31 others.
    alone = (sample, window, 1, min(opts.read_seconds, 15.0), opts.seed)
    single = {"rollup": _readers(targets.pg_dsn, 0, *alone),
              "raw": _readers(targets.pg_dsn, 1, *alone)}  # fmt: skip
    # CPU per query, one client, each protocol: pgbench's text results over the simple protocol
    # (a tool that sends SQL text), the extended one (parse and plan every time, as an unnamed
    # statement) and prepared (planned once per connection, then executed).
    cpu_seconds = min(opts.read_seconds, 10.0)
    cpu = {
        name: {
            protocol: _cpu_per_query(
                targets.pg_dsn,
                READ_QUERIES[name][0],
                sample,
                window,
                protocol,
                cpu_seconds,
                opts.seed,
            )
            for protocol in PROTOCOLS
        }
        | {
            "prepared_binary": _binary_cpu_per_query(
                targets.pg_dsn, READ_QUERIES[name][0], sample, window, cpu_seconds, opts.seed
            )
        }
        for name in READ_QUERIES
    }
    with connect(targets.pg_dsn) as conn:
        plan = explain_device_day(conn, sample["device_id"][0], window)
    return {
        "readers": opts.readers,
        "seconds_each": opts.read_seconds,
        "dataset": dataset,
        "writer_pace_s": opts.writer_pace_s,
        "minutes_rewritten_meanwhile": rewrites["windows"],
        "coarse_windows_rewritten_meanwhile": rewrites["coarse_windows"],
        "tables": READ_TABLES,
        "rollup": rollup,
        "raw": raw,
        "p95_speedup": raw["p95_ms"] / rollup["p95_ms"],
        "p95_speedup_by_query": {
            k: raw["by_query"][k]["p95_ms"] / rollup["by_query"][k]["p95_ms"] for k in READ_QUERIES
        },
        "rollup_each_alone": alone_at_n,
        "device_1m_24h_capacity": capacity,
        "single_reader": {
            table: {k: v["p50_ms"] for k, v in single[table]["by_query"].items()}
            for table in single
        },
        "rollup_cpu_per_query": cpu,
        "device_1m_24h_plan": plan,
    }
