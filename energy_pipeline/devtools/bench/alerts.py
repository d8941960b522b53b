"""Seconds per minute of alert rule evaluation: a fleet of devices, a mix of rules (thresholds,
anomalies with a 7-day baseline, quality), minute rows and hourly history in PostgreSQL.

    python -m energy_pipeline.devtools.bench.alerts [--devices 5000] [--rules 100] [--minutes 20]

starts a throwaway PostgreSQL on a free loopback port, or uses `--dsn` (a migrated, empty
database). Prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from energy_pipeline.alerts.evaluate import (
    WindowEvaluation,
    evaluate,
    read_baselines,
    read_values,
    rules_frame,
)
from energy_pipeline.alerts.lifecycle import apply_windows
from energy_pipeline.alerts.rules import apply_rules, enabled_rules, parse_rules
from energy_pipeline.storage import connect, create_partitions

DEVICES_PER_HOUSEHOLD = 5
BASELINE_DAYS = 7
DEVICE_METRICS = ("power_w_avg", "power_w_max", "energy_wh_sum")


# The bench's first minute: a fixed evening minute (households draw most then), not the clock.
FIRST_MINUTE = datetime(2026, 11, 2, 18, 10, tzinfo=UTC)


def rule_file(count: int) -> str:
    """`count` rules over all devices: 4 quality rules, 2 household rules, then thresholds and
    anomalies on every device in turns."""
    lines = [
        "rules:",
        "  - {id: silent, kind: quality, check: silent, minutes: 5}",
        "  - {id: rejected, kind: quality, check: rejected_ratio, above_percent: 5}",
        "  - {id: reporting, kind: quality, check: reporting, below_percent: 90}",
        "  - {id: lag, kind: quality, check: pipeline_lag, above_seconds: 60}",
        "  - {id: hh-draw, kind: threshold, scope: household, metric: power_w_avg,"
        " operator: '>', threshold: 9000}",
        "  - {id: hh-anomaly, kind: anomaly, scope: household, k: 3}",
    ]
    for i in range(count - len(lines) + 1):
        if i % 2:
            lines.append(f"  - {{id: anomaly-{i}, kind: anomaly, k: {3 + i % 5}}}")
        else:
            # Above every device's usual draw: only the bench's rare spikes pass them.
            metric = DEVICE_METRICS[i % len(DEVICE_METRICS)]
            limit = 60 + i if metric == "energy_wh_sum" else 3500 + 50 * i
            lines.append(
                f"  - {{id: threshold-{i}, kind: threshold, metric: {metric}, operator: '>',"
                f" threshold: {limit}, for: {1 + i % 3}, cooldown: 10m}}"
            )
    return "\n".join(lines[: count + 1]) + "\n"


def _copy(conn: psycopg.Connection, table: str, columns: str, rows: list[tuple]) -> None:
    with conn.transaction(), conn.cursor() as cur:
        with cur.copy(f"COPY energy.{table} ({columns}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)


def load_fleet(conn: psycopg.Connection, devices: int, minutes: list[datetime]) -> None:
    """Registry, hourly history at the minutes' hour on the previous days, and minute rows."""
    rng = random.Random(7)
    ids = [f"dev-{i:05d}" for i in range(devices)]
    household = {d: f"hh-{i // DEVICES_PER_HOUSEHOLD:05d}" for i, d in enumerate(ids)}
    typical = {d: rng.uniform(20, 2500) for d in ids}
    hour = minutes[0].replace(minute=0)
    create_partitions(
        conn, "device_rollup_1h", (hour - timedelta(days=BASELINE_DAYS)).date(), hour.date()
    )
    create_partitions(conn, "device_rollup_1m", minutes[0].date(), minutes[-1].date())
    _copy(conn, "devices", "device_id, household_id", [(d, household[d]) for d in ids])
    hours = [
        (d, hour - timedelta(days=k), household[d], 3600, p, p, p, p, hour)
        for d in ids
        for k in range(1, BASELINE_DAYS + 1)
        for p in [typical[d] * rng.uniform(0.9, 1.1)]
    ]
    _copy(
        conn,
        "device_rollup_1h",
        "device_id, bucket, household_id, sample_count, power_w_avg, power_w_min, power_w_max, "
        "energy_wh_sum, computed_at",
        hours,
    )
    rows = []
    for minute in minutes:
        for d in ids:
            if rng.random() < 0.002:  # a few silent devices
                continue
            p = typical[d] * rng.uniform(0.8, 1.2) * (8 if rng.random() < 0.001 else 1)
            rows.append((d, minute, household[d], 60, p, p * 0.9, p * 1.1, p / 60, 0, minute))
    _copy(
        conn,
        "device_rollup_1m",
        "device_id, bucket, household_id, sample_count, power_w_avg, power_w_min, power_w_max, "
        "energy_wh_sum, rejected_count, computed_at",
        rows,
    )


def roll_up(conn: psycopg.Connection, minute: datetime, devices: int) -> None:
    """The minute's ledger row, 70 s after its start: it is rolled up and its check may run."""
    _copy(
        conn,
        "rollup_minutes",
        "bucket, points_read, power_w_points, energy_wh_points, duplicates_dropped, rejected, "
        "devices, computed_at",
        [(minute, 0, 0, 0, 0, 0, devices, minute + timedelta(seconds=70))],
    )


def p95(samples: list[float]) -> float:
    """The 95th percentile (linear between the nearest ranks; the value itself for one)."""
    if len(samples) < 2:
        return samples[0]
    return statistics.quantiles(samples, n=20, method="inclusive")[18]


def _summary(samples: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(samples), 4),
        "p95": round(p95(samples), 4),
        "max": round(max(samples), 4),
    }


def _timed(stages: dict[str, list[float]], name: str, fn: Any, *args: Any) -> Any:
    began = time.perf_counter()
    result = fn(*args)
    stages.setdefault(name, []).append(time.perf_counter() - began)
    return result


def measure(
    dsn: str,
    devices: int = 5000,
    rules: int = 100,
    minutes: int = 5,
    first: datetime = FIRST_MINUTE,
) -> dict[str, Any]:
    """Load a fleet into the (migrated, empty) database at `dsn`, evaluate and apply each minute
    in turn, and return seconds per minute (evaluation: read, baseline, evaluate) and per stage.

    The minutes are pinned (`first` on), so the figures do not depend on when the bench runs."""
    window = [first + timedelta(minutes=i) for i in range(minutes)]
    stages: dict[str, list[float]] = {}
    totals, with_episodes, cpu, cpu_with_episodes, breached, pairs = [], [], [], [], [], 0
    with connect(dsn) as conn:
        load_fleet(conn, devices, window)
        apply_rules(conn, parse_rules(rule_file(rules)))
        stored = enabled_rules(conn, "1m")
        frame = rules_frame(stored)
        for minute in window:
            roll_up(conn, minute, devices)  # as in production: rolled up, then checked
            began, began_cpu = time.perf_counter(), time.process_time()
            values = _timed(stages, "read_values", read_values, conn, "1m", minute)
            baselines = _timed(stages, "read_baselines", read_baselines, conn, stored, minute)
            results = _timed(stages, "evaluate", evaluate, values, frame, baselines)
            totals.append(time.perf_counter() - began)
            cpu.append(time.process_time() - began_cpu)
            ev = WindowEvaluation("1m", minute, results)
            now = minute + timedelta(seconds=75)
            _timed(stages, "apply_episodes", apply_windows, conn, stored, [ev], now)
            with_episodes.append(time.perf_counter() - began)
            cpu_with_episodes.append(time.process_time() - began_cpu)
            pairs = results.height
            breached.append({"minute": minute.isoformat(), "breached": ev.breached.height})
    return {
        "devices": devices,
        "rules": len(stored),
        "minutes": minutes,
        "pairs_evaluated": pairs,
        # Evaluation: read the window, read the baselines, evaluate every rule × entity.
        "seconds_per_minute_median": round(statistics.median(totals), 4),
        "seconds_per_minute_p95": round(p95(totals), 4),
        "seconds_per_minute_max": round(max(totals), 4),
        # Evaluation and applying the window to the episodes (pending, episodes, outbox): what
        # the check's `run_seconds_evaluating` covers.
        "seconds_per_minute_with_episodes": _summary(with_episodes),
        # This process's CPU seconds (Polars threads included; PostgreSQL's own work not).
        "cpu_seconds_per_minute_median": round(statistics.median(cpu), 4),
        "cpu_seconds_per_minute_with_episodes_median": round(
            statistics.median(cpu_with_episodes), 4
        ),
        "per_stage_median": {k: round(statistics.median(v), 4) for k, v in stages.items()},
        "per_stage_p95": {k: round(p95(v), 4) for k, v in stages.items()},
        "per_stage_max": {k: round(max(v), 4) for k, v in stages.items()},
        "breached_per_minute": breached,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=5000)
    parser.add_argument("--rules", type=int, default=100)
    # Enough minutes for a p95 that means something; the first computes the hour's baselines.
    parser.add_argument("--minutes", type=int, default=20)
    parser.add_argument("--dsn", help="a migrated, empty database (default: a throwaway server)")
    args = parser.parse_args(argv)
    if args.dsn:
        figures = measure(args.dsn, args.devices, args.rules, args.minutes)
    else:
        from energy_pipeline.devtools.services import LocalPostgres, free_port
        from energy_pipeline.migrations import upgrade

        with tempfile.TemporaryDirectory(prefix="alerts-bench-") as root:
            Path(root).chmod(0o755)
            server = LocalPostgres(Path(root) / "pg", free_port(), fast_unsafe=True)
            server.start()
            try:
                server.create_database("alerts_bench")
                upgrade(server.dsn("alerts_bench"))
                figures = measure(
                    server.dsn("alerts_bench"), args.devices, args.rules, args.minutes
                )
            finally:
                server.stop()
    json.dump(figures, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
