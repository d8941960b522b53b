"""Where a minute's read from InfluxDB spends its time, on data already in a database.

    python -m energy_pipeline.devtools.bench.influx_read --url http://127.0.0.1:18086 \\
        --database energy_bench_live [--minutes 4] [--repeat 5] [--json out.json]

Picks `--minutes` whole minutes spread over the measurement's span (or takes `--minute` times)
and times, for each, the pipeline's own read (`read_window`: counts, then the points, in 1 and
in `READ_PARALLELISM` slices) beside raw reads of fewer fields or seconds and a bare count of
the same minute. The count decodes the same blocks as the raw reads, so the gap between them is
what returning the points costs. Prints a table of medians (seconds) and, with `--json`, writes
every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from energy_pipeline.config import READ_PARALLELISM
from energy_pipeline.influx import InfluxClient, quote_ident, to_ns
from energy_pipeline.sources import read_window

MINUTE = timedelta(minutes=1)
RAW = "SELECT energy_wh, power_w, voltage_v, device_id::tag, household_id::tag FROM {m} "
WHERE = "WHERE time >= $start AND time < $end"


def _queries(measurement: str) -> dict[str, tuple[str, timedelta]]:
    """Label → (InfluxQL, how much of the minute it reads)."""
    m = quote_ident(measurement)
    return {
        "raw points, 3 fields + 2 tags": (f"{RAW.format(m=m)}{WHERE} GROUP BY device_id", MINUTE),
        "raw points, power_w only": (f"SELECT power_w FROM {m} {WHERE} GROUP BY device_id", MINUTE),
        "raw points of the first 10 s": (
            f"{RAW.format(m=m)}{WHERE} GROUP BY device_id",
            timedelta(seconds=10),
        ),
        "count(power_w)": (f"SELECT count(power_w) FROM {m} {WHERE}", MINUTE),
        "count(power_w) by device": (
            f"SELECT count(power_w) FROM {m} {WHERE} GROUP BY device_id",
            MINUTE,
        ),
    }


def _median_s(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def span(client: InfluxClient, measurement: str) -> tuple[datetime, datetime] | None:
    """The first and last point's times of the measurement (by `power_w`), or None if empty."""
    m = quote_ident(measurement)
    found = []
    for fn in ("first", "last"):
        series = client.query_json(f"SELECT {fn}(power_w) FROM {m}")[0].get("series")
        if not series:
            return None
        found.append(datetime.fromtimestamp(series[0]["values"][0][0] / 1e9, UTC))
    return found[0], found[1]


def spread_minutes(first: datetime, last: datetime, count: int) -> list[datetime]:
    """`count` whole minutes evenly spread from the first whole minute to the last one."""
    lo = first.replace(second=0, microsecond=0)
    if lo < first:
        lo += MINUTE
    hi = last.replace(second=0, microsecond=0) - MINUTE  # the minute of `last` may be partial
    if hi < lo:
        return []
    steps = int((hi - lo) / MINUTE)
    picks = {lo + MINUTE * round(i * steps / max(count - 1, 1)) for i in range(count)}
    return sorted(picks)


def measure(
    client: InfluxClient, measurement: str, minutes: list[datetime], repeat: int
) -> dict[str, dict[str, float]]:
    """Label → minute (ISO) → median seconds, for the pipeline's read and each query."""
    figures: dict[str, dict[str, float]] = {}
    slices = sorted({1, READ_PARALLELISM})
    for start in minutes:
        key = start.strftime("%Y-%m-%dT%H:%M")
        for parallel in slices:
            label = f"read_window, {parallel} slice{'s' if parallel > 1 else ''}"
            read = partial(read_window, client, measurement, start, start + MINUTE, parallel)
            figures.setdefault(label, {})[key] = _median_s(read, repeat)
        for label, (query, length) in _queries(measurement).items():
            params = {"start": to_ns(start), "end": to_ns(start + length)}
            ask = client.query_json if label.startswith("count") else client.query_frame
            figures.setdefault(label, {})[key] = _median_s(partial(ask, query, params), repeat)
    return figures


def table(figures: dict[str, dict[str, float]]) -> str:
    """A Markdown table: a row per read, a column per minute, median seconds."""
    minutes = list(next(iter(figures.values()), {}))
    lines = [
        "| median seconds | " + " | ".join(m[11:] for m in minutes) + " |",
        "|---|" + "---:|" * len(minutes),
    ]
    for label, row in figures.items():
        lines.append(f"| {label} | " + " | ".join(f"{row[m]:.2f}" for m in minutes) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--database", required=True)
    parser.add_argument("--measurement", default="telemetry")
    parser.add_argument("--minutes", type=int, default=4, help="minutes spread over the data")
    parser.add_argument(
        "--minute", action="append", default=[], help="a minute to read (UTC, 2026-11-29T05:10)"
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    client = InfluxClient(args.url, args.database)
    if args.minute:
        minutes = [datetime.fromisoformat(m).replace(tzinfo=UTC) for m in args.minute]
    else:
        found = span(client, args.measurement)
        if found is None:
            sys.stderr.write(f"no points in {args.database}.{args.measurement}\n")
            return 1
        minutes = spread_minutes(*found, max(1, args.minutes))
    if not minutes:
        sys.stderr.write("no whole minute of data to read\n")
        return 1
    figures = measure(client, args.measurement, minutes, max(1, args.repeat))
    sys.stdout.write(table(figures) + "\n")
    if args.json:
        out: dict[str, Any] = {"database": args.database, "repeat": args.repeat, **figures}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
