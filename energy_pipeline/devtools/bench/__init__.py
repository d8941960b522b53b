"""`energy-pipeline bench`: measured figures for the minute path, side by side with references.

Loads a seeded dataset at 1 Hz per device into InfluxDB and into a raw PostgreSQL table, then
measures in one run: the pipeline per stage for single minutes, a long ranged run (peak memory in a
child process), InfluxDB's own GROUP BY and PostgreSQL's GROUP BY over the raw table for the same
minutes, concurrent BI reads on rollups versus the raw table while the pipeline writes, and cost per
point at several fleet sizes. Timings are reported, never asserted.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

from energy_pipeline.devtools.bench.common import (
    BenchOptions,
    BenchTargets,
    Progress,
    index_raw,
    load_dataset,
    prepare_postgres,
    reset_influx,
    wait_for_quiet_influx,
)
from energy_pipeline.devtools.bench.hierarchy import measure_hierarchy
from energy_pipeline.devtools.bench.live import measure_live
from energy_pipeline.devtools.bench.pipeline import (
    measure_late_check,
    measure_minutes,
    measure_ranged,
    measure_scaling,
)
from energy_pipeline.devtools.bench.reads import READ_QUERIES, measure_reads
from energy_pipeline.devtools.simulator import build_fleet
from energy_pipeline.storage import connect

__all__ = ["READ_QUERIES", "BenchOptions", "BenchTargets", "format_table", "run_bench"]


def run_bench(
    targets: BenchTargets,
    opts: BenchOptions,
    say: Progress,
    live_minutes: float = 0,
    live_dsns: tuple[str, str] | None = None,
    live_only: bool = False,
    live_alerts: bool = False,
    reads_only: bool = False,
) -> dict[str, Any]:
    """Run every measurement; returns the figures (also what `--json` writes).

    `live_dsns` (rollup database, Dagster storage database) enables the live section;
    `live_only` skips the others; `live_alerts` adds 100 alert rules and a webhook receiver;
    `reads_only` loads `opts.minutes` of history and measures only the readers.
    """
    if live_only:
        if not (live_minutes and live_dsns):
            raise ValueError("live_only needs live_minutes and live_dsns")
        say(f"live for {live_minutes} minutes: simulator + Dagster daemon")
        live = measure_live(targets, *live_dsns, opts, live_minutes, say, live_alerts)
        return {"options": asdict(opts), "started_at": datetime.now(UTC).isoformat(), "live": live}
    fleet = build_fleet(opts.devices, seed=opts.seed)
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    span = opts.minutes if reads_only else max(opts.minutes, opts.long_minutes)
    # History fills [start, start + span); fresh minutes follow it and still end in the past. The
    # history ends on the hour, so the readers' window holds whole 5-minute and hourly windows.
    end = (now - timedelta(minutes=opts.minutes + 2)).replace(minute=0)
    start = end - timedelta(minutes=span)
    result: dict[str, Any] = {"options": asdict(opts), "started_at": datetime.now(UTC).isoformat()}
    influx = targets.influx()
    with connect(targets.pg_dsn) as conn:
        conn.autocommit = False
        say(f"preparing PostgreSQL and loading {span} minutes x {opts.devices} devices at 1 Hz")
        prepare_postgres(targets.pg_dsn, conn, fleet)
        conn.commit()
        reset_influx(influx)
        result["load"] = load_dataset(influx, conn, fleet, start, span, opts.seed, say)
        say("indexing the raw PostgreSQL table")
        index_raw(conn)
        conn.commit()
        say("waiting for InfluxDB to finish compacting the new data")
        result["influx_quiesce_s"] = wait_for_quiet_influx(influx)
        conn.autocommit = True
        if reads_only:
            say(f"measuring {opts.readers} concurrent readers")
            result["reads"] = measure_reads(targets, fleet, start, span, opts, say)
            return result
        say(
            f"measuring {opts.minutes} fresh minutes (written just before), pipeline and references"
        )
        fresh_start = start + timedelta(minutes=span)
        result["one_minute"] = measure_minutes(
            targets, conn, fresh_start, opts.minutes, fresh_fleet=fleet, seed=opts.seed
        )
        say(f"measuring {opts.minutes} minutes of compacted history, pipeline and references")
        result["one_minute_history"] = measure_minutes(targets, conn, start, opts.minutes)
        say("measuring the late-data check over the last 15 minutes of history")
        result["late_check"] = measure_late_check(targets, start + timedelta(minutes=span - 15), 15)
        if opts.long_minutes:
            say(f"measuring a {opts.long_minutes}-minute ranged run in a child process")
            # Let InfluxDB compact the fresh minutes just written, so the ranged run does not pay.
            wait_for_quiet_influx(influx)
            result["ranged"] = measure_ranged(targets, start, opts.long_minutes, opts.chunk_minutes)
        else:
            result["ranged"] = None
        say("measuring the hierarchy per window (5-minute household, device hour)")
        result["hierarchy"] = measure_hierarchy(targets, start, start + timedelta(minutes=span))
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
        result["live"] = measure_live(targets, *live_dsns, opts, live_minutes, say, live_alerts)
    return result


def _load_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("load: points written (InfluxDB and raw PG table)", f"{r['load']['points']:,}"),
        ("load: points/s", f"{r['load']['points_per_s']:,.0f}"),
        ("wait for InfluxDB compactions after load (s)", f"{r['influx_quiesce_s']:.0f}"),
    ]


def _pipeline_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """Rows of the minute path, the late-data check, the ranged run and the hierarchy."""
    rows: list[tuple[str, str]] = []
    for key, label in (("one_minute", "fresh minute"), ("one_minute_history", "history minute")):
        o = r[key]
        rows += [
            (f"{label}: points", f"{o['points_per_minute']:,}"),
            *((f"{label}: {k} (s, median)", f"{v:.3f}") for k, v in o["stages_s"].items()),
            (
                f"{label}:   unverified power/energy read, reference (s)",
                f"{o['unverified_read_s']:.3f}",
            ),  # fmt: skip
            (f"{label}: in-asset total (s, median)", f"{o['in_asset_s']:.3f}"),
            (f"{label}: in-asset total (s, worst)", f"{o['in_asset_max_s']:.3f}"),
            (f"{label}: points/s", f"{o['points_per_s']:,.0f}"),
            (f"{label}: InfluxDB GROUP BY time(1m), device_id (s)", f"{o['influx_groupby_s']:.3f}"),
            (f"{label}:   pipeline / InfluxDB (< 1: pipeline faster)", f"{o['influx_ratio']:.2f}"),
            (f"{label}: PostgreSQL raw-table GROUP BY (s)", f"{o['pg_raw_groupby_s']:.3f}"),
            (f"{label}:   pipeline / PostgreSQL raw", f"{o['pg_raw_ratio']:.2f}"),
        ]
    if r.get("late_check"):
        lc = r["late_check"]
        rows += [
            (f"late-data check, {lc['minutes']} min: checksums, count+sum x3 (s)",
             f"{lc['checksum_s']:.3f}"),
            (f"late-data check, {lc['minutes']} min: counts of 2 fields, reference (s)",
             f"{lc['counts_only_s']:.3f}"),
        ]  # fmt: skip
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
    for grain, label in (("household_5m", "household 5-minute window"),
                         ("device_1h", "device hour")):  # fmt: skip
        h = r["hierarchy"][grain]
        rows += [
            (f"hierarchy: one {label} from {h['minute_rows_per_window']:,} minute rows (s)",
             f"{h['seconds_median']:.3f}"),
            (f"hierarchy: one {label}: worst of {h['windows_timed']} (s) / rows written",
             f"{h['seconds_max']:.3f} / {h['rows_written_per_window']:,}"),
        ]  # fmt: skip
    return rows


def _reads_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """Rows of the BI readers: rollups against the raw table, capacity, CPU per query."""
    m, rd = r["options"], r["reads"]
    ds = rd["dataset"]
    rows = [
        ("reads: sampled households / devices", f"{ds['households']} / {ds['devices']}"),
        (f"reads: window (h) / of it, all {m['devices']} devices (min)",
         f"{ds['hours']} / {ds['all_devices_minutes']}"),
        ("reads: raw rows in window, sampled devices", f"{ds['raw_rows_in_window']:,}"),
        ("reads: rollup rows in window, sampled devices", f"{ds['rollup_rows_in_window']:,}"),
        ("reads: household_rollup_5m / device_rollup_1h rows in window",
         f"{ds['household_5m_rows_in_window']:,} / {ds['device_1h_rows_in_window']:,}"),
        ("reads: coarse tables filled from minute rows (s)", f"{ds['hierarchy_fill_s']:.1f}"),
        ("reads: raw table bytes per row (heap + indexes)", f"{ds['raw_table_bytes_per_row']:.0f}"),
    ]  # fmt: skip
    for table, where in (("rollup", "rollups"), ("raw", "raw table")):
        t = rd[table]
        rows += [
            (f"reads on {where}, {rd['readers']} readers: p50/p95/p99 (ms)",
             f"{t['p50_ms']:.1f}/{t['p95_ms']:.1f}/{t['p99_ms']:.1f}"),
            (f"reads on {where}: queries/s", f"{t['qps']:,.1f}"),
        ]  # fmt: skip
    pace = rd.get("writer_pace_s") or 0
    rows += [
        ("reads: writer, one fleet minute every (s; 0: back to back)", f"{pace:g}"),
        ("reads: minutes / coarse windows rewritten meanwhile",
         f"{rd['minutes_rewritten_meanwhile']:,} / {rd['coarse_windows_rewritten_meanwhile']:,}"),
    ]  # fmt: skip
    for name, ratio in rd["p95_speedup_by_query"].items():
        for table in ("rollup", "raw"):
            q = rd[table]["by_query"][name]
            source = rd["tables"][name].removeprefix("energy.") if table == "rollup" else "raw"
            rows.append(
                (f"reads {name}: {source} p50/p95 (ms)", f"{q['p50_ms']:.1f}/{q['p95_ms']:.1f}")
            )
        rows.append((f"reads {name}: raw p95 / rollup p95", f"{ratio:.1f}"))
    rows.append(("reads: raw p95 / rollup p95, all queries", f"{rd['p95_speedup']:.1f}"))
    for name, q in rd.get("rollup_each_alone", {}).items():
        rows.append((f"reads {name} alone, {rd['readers']} readers: p50/p95 (ms)",
                     f"{q['p50_ms']:.1f}/{q['p95_ms']:.1f}"))  # fmt: skip
    for name in rd["single_reader"]["rollup"]:
        one = rd["single_reader"]
        rows.append((f"reads {name}, 1 reader, idle: rollup / raw p50 (ms)",
                     f"{one['rollup'][name]:.1f} / {one['raw'][name]:.1f}"))  # fmt: skip
    if cap := rd.get("device_1m_24h_capacity"):
        for c in cap["closed_loop"]:
            rows.append((f"reads device_1m_24h, {c['readers']} readers, closed loop: "
                         "queries/s, p50/p95 (ms)",
                         f"{c['qps']:,.0f}, {c['p50_ms']:.1f}/{c['p95_ms']:.1f}"))  # fmt: skip
        for o in cap["open_loop"]:
            rows.append((f"reads device_1m_24h, {o['readers']} readers asking "
                         f"{o['demand_qps']:,.0f}/s ({o['share_of_max']:.0%} of max): p50/p95 (ms)",
                         f"{o['p50_ms']:.1f}/{o['p95_ms']:.1f}"))  # fmt: skip
    for name, by_protocol in rd.get("rollup_cpu_per_query", {}).items():
        cpu = "/".join(
            f"{v['backend_cpu_ms']:.2f}" if v.get("backend_cpu_ms") is not None else "n/a"
            for v in by_protocol.values()
        )
        rows.append((f"reads {name}: backend CPU ms/query, {'/'.join(by_protocol)}", cpu))
    return rows


def _scaling_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [
        (f"scaling {x['devices']} devices: us/point (s/minute)",
         f"{x['us_per_point']:.2f} ({x['in_asset_s']:.3f})")
        for x in r["scaling"]
    ]  # fmt: skip
    rows.append(("scaling: max/min cost per point", f"{r['scaling_spread']:.2f}"))
    rows.append(("scaling: largest deviation from the mean cost per point",
                 f"{r['scaling_max_deviation']:.0%}"))  # fmt: skip
    return rows


def format_table(r: dict[str, Any]) -> str:
    """The figures as a plain-text table."""
    m = r["options"]
    rows = []
    for key, section in (("load", _load_rows), ("one_minute", _pipeline_rows),
                         ("reads", _reads_rows), ("scaling", _scaling_rows)):  # fmt: skip
        if r.get(key):
            rows += section(r)
    for k, v in (r.get("live") or {}).items():
        if isinstance(v, int | float):
            rows.append((f"live: {k}", f"{v:.2f}"))
    header = f"energy-pipeline bench: {m['devices']} devices at 1 Hz, seed {m['seed']}"
    width = max(len(label) for label, _ in rows)
    body = [f"{label:<{width}}  {value:>16}" for label, value in rows]
    return "\n".join([header, f"{'measure':<{width}}  {'value':>16}", *body])
