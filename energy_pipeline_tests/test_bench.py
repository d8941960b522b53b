"""The benchmark's quick mode runs against the real servers and yields well-formed figures.

Only shape and sanity are checked here; timings are never asserted.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime

from energy_pipeline.devtools.bench import (
    READ_QUERIES,
    BenchOptions,
    BenchTargets,
    format_table,
    run_bench,
)
from energy_pipeline.influx import InfluxClient, to_ns


def test_quick_bench_produces_complete_sane_figures(settings, influx_db, influx_server):
    # Quick mode, plus a 2-minute ranged run so the child-process path is exercised too.
    opts = replace(BenchOptions.quick(), long_minutes=2)
    targets = BenchTargets(
        settings.influx_url, influx_db.database, settings.pg_dsn, influx_pid=influx_server.pid
    )
    messages: list[str] = []
    try:
        result = run_bench(targets, opts, messages.append)
    finally:
        for n in opts.scaling:
            influx_db.query_json(f'DROP DATABASE "{influx_db.database}_scale_{n}"')

    figures = json.loads(json.dumps(result, default=str))
    per_minute = opts.devices * 60
    assert figures["influx_quiesce_s"] >= 0
    assert figures["load"]["points"] == per_minute * opts.minutes
    assert figures["one_minute_history"]["points_per_minute"] == per_minute
    one = figures["one_minute"]
    assert one["points_per_minute"] == per_minute
    assert set(one["stages_s"]) == {"read", "validate", "roll_up", "write"}
    assert all(v > 0 for v in one["stages_s"].values())
    assert one["in_asset_max_s"] >= one["in_asset_s"] > 0
    assert one["influx_groupby_s"] > 0 and one["pg_raw_groupby_s"] > 0
    assert abs(one["influx_ratio"] - one["in_asset_s"] / one["influx_groupby_s"]) < 1e-9
    ranged = figures["ranged"]
    assert ranged["points"] == per_minute * 2
    assert ranged["peak_rss_mib"] > 0 and ranged["seconds"] > 0
    assert set(ranged["cpu_s"]) == {"influxdb", "pipeline", "postgres"}
    # Counted in clock ticks (10 ms): a small backend's share can round to zero.
    assert all(v >= 0 for v in ranged["cpu_s"].values()) and ranged["cpu_s"]["pipeline"] > 0
    assert ranged["cpu_floor_s"] == sum(ranged["cpu_s"].values()) / ranged["cores"]
    assert ranged["read_only_s"] > 0 and ranged["read_only_influxdb_cpu_s"] >= 0
    for grain, rows_per_window in (
        ("household_5m", opts.devices // 5),  # build_fleet: 5 devices a household
        ("device_1h", opts.devices),
    ):
        h = figures["hierarchy"][grain]
        assert h["windows_timed"] > 0 and h["minute_rows_per_window"] > 0
        assert 0 < h["seconds_median"] <= h["seconds_max"]
        assert h["rows_written_per_window"] == rows_per_window
    reads = figures["reads"]
    assert reads["tables"] == {
        "household_5m_24h": "energy.household_rollup_5m",
        "top5_devices_24h": "energy.device_rollup_1h",
        "device_1m_24h": "energy.device_rollup_1m",
    }
    sample = reads["dataset"]
    span = max(opts.minutes, opts.long_minutes)
    assert sample["households"] == opts.read_households
    assert sample["devices"] == opts.read_households * 5  # build_fleet: 5 devices a household
    # The sampled devices have every second and every minute of the window in both tables.
    assert sample["raw_rows_in_window"] == sample["devices"] * opts.read_hours * 3600
    assert sample["rollup_rows_in_window"] == sample["devices"] * opts.read_hours * 60
    # ... and every 5-minute window of their households and every hour of their devices.
    assert sample["household_5m_rows_in_window"] == sample["households"] * opts.read_hours * 12
    assert sample["device_1h_rows_in_window"] == sample["devices"] * opts.read_hours
    assert sample["hierarchy_fill_s"] > 0
    assert sample["points_loaded"] == sample["devices"] * (opts.read_hours * 60 - span) * 60
    assert sample["all_devices_minutes"] == span and sample["raw_table_bytes_per_row"] > 0
    for table in ("rollup", "raw"):
        t = reads[table]
        assert t["queries"] == sum(q["queries"] for q in t["by_query"].values()) > 0
        assert 0 < t["p50_ms"] <= t["p95_ms"] <= t["p99_ms"]
        assert set(t["by_query"]) == set(READ_QUERIES)
        for q in t["by_query"].values():
            assert q["queries"] > 0 and 0 < q["p50_ms"] <= q["p95_ms"]
    assert set(reads["p95_speedup_by_query"]) == set(READ_QUERIES)
    assert all(v > 0 for v in reads["p95_speedup_by_query"].values())
    assert reads["p95_speedup"] > 0
    assert reads["minutes_rewritten_meanwhile"] > 0
    assert reads["coarse_windows_rewritten_meanwhile"] > 0
    assert set(reads["rollup_each_alone"]) == set(READ_QUERIES)
    for q in reads["rollup_each_alone"].values():
        assert q["queries"] > 0 and 0 < q["p50_ms"] <= q["p95_ms"]
    for table in ("rollup", "raw"):
        alone = reads["single_reader"][table]
        assert set(alone) == set(READ_QUERIES) and all(v > 0 for v in alone.values())
    _check_capacity(reads["device_1m_24h_capacity"], opts.readers)
    assert [r["devices"] for r in figures["scaling"]] == list(opts.scaling)
    assert [r["points"] for r in figures["scaling"]] == [n * 60 for n in opts.scaling]
    assert figures["scaling_spread"] >= 1.0
    assert 0 <= figures["scaling_max_deviation"] < figures["scaling_spread"]
    table = format_table(result)
    assert "fresh minute: in-asset total" in table and "history minute: read" in table
    assert "reads on raw" in table and "reads top5_devices_24h: raw p95 / rollup p95" in table
    assert "reads household_5m_24h: household_rollup_5m p50/p95" in table
    assert "reads top5_devices_24h: device_rollup_1h p50/p95" in table
    assert "hierarchy: one household 5-minute window" in table
    assert "reads device_1m_24h: backend CPU ms/query, simple/extended/prepared" in table
    assert f"reads device_1m_24h, {opts.readers} readers, closed loop" in table
    assert any("loaded" in m for m in messages)


def _check_capacity(capacity: dict, readers: int) -> None:
    """Closed loop at a quarter, half and all readers; open loop at shares of what all served."""
    closed = capacity["closed_loop"]
    assert [c["readers"] for c in closed] == sorted({max(1, readers // 4), max(1, readers // 2),
                                                     readers})  # fmt: skip
    assert all(c["qps"] > 0 and 0 < c["p50_ms"] <= c["p95_ms"] for c in closed)
    served = closed[-1]["qps"]
    shares = [o["share_of_max"] for o in capacity["open_loop"]]
    assert shares == [0.25, 0.5, 0.75]
    for o in capacity["open_loop"]:
        assert o["readers"] == readers and o["demand_qps"] == served * o["share_of_max"]
        assert o["qps"] > 0 and 0 < o["p50_ms"] <= o["p95_ms"]


def test_reads_only_bench_loads_a_short_history_and_measures_only_the_readers(
    settings, influx_db, influx_server
):
    # A paced writer: one minute of the fleet every 2 s, as the live pipeline's every 60 s.
    opts = replace(BenchOptions.quick(), read_seconds=1.0, writer_pace_s=2.0)
    targets = BenchTargets(
        settings.influx_url, influx_db.database, settings.pg_dsn, influx_pid=influx_server.pid
    )
    result = run_bench(targets, opts, lambda _: None, reads_only=True)

    figures = json.loads(json.dumps(result, default=str))
    assert set(figures) == {"options", "started_at", "load", "influx_quiesce_s", "reads"}
    assert figures["load"]["points"] == opts.devices * 60 * opts.minutes
    reads = figures["reads"]
    assert reads["dataset"]["all_devices_minutes"] == opts.minutes
    assert reads["rollup"]["queries"] > 0 and reads["raw"]["queries"] > 0
    assert reads["writer_pace_s"] == 2.0 and reads["minutes_rewritten_meanwhile"] >= 1
    _check_capacity(reads["device_1m_24h_capacity"], opts.readers)
    cpu = reads["rollup_cpu_per_query"]["device_1m_24h"]
    assert set(cpu) == {"simple", "extended", "prepared", "prepared_binary"}
    assert all(v["queries"] > 0 for v in cpu.values())
    table = format_table(result)
    assert "reads on rollups" in table and "fresh minute" not in table and "scaling" not in table


def test_live_alert_figures_count_duplicates_and_keep_retried_notifications_apart():
    import yaml

    from energy_pipeline.alerts.rules import parse_rules
    from energy_pipeline.devtools.bench.live_alerts import (
        HEARTBEAT_DEVICES,
        Receiver,
        bench_rules,
        summarise,
    )
    from energy_pipeline.devtools.simulator import build_fleet

    rules = parse_rules(yaml.safe_dump({"rules": bench_rules()}))
    assert len(rules) == 100 and len({r.rule_id for r in rules}) == 100
    # The every-minute rules watch devices the bench's simulated fleet has.
    fleet = set(build_fleet(5000, hostile_ids=True)["device_id"].to_list())
    assert set(HEARTBEAT_DEVICES) <= fleet

    end = "2027-01-15T08:00:00+00:00"
    closed = datetime.fromisoformat(end).timestamp()
    receiver = Receiver()
    receiver.received = [
        (closed + 8.0, "a", {"kind": "firing", "window_end": end}),
        (closed + 9.0, "a", {"kind": "firing", "window_end": end}),  # sent again: a duplicate
        (closed + 6.0, "b", {"kind": "repeat", "window_end": end}),
        (closed + 70.0, "c", {"kind": "firing", "window_end": end}),  # waited out the outage
        (closed + 5.0, "d", {"kind": "resolved", "window_end": end}),
    ]
    outbox = {"rows": 4, "delivered": 4, "dead_lettered": 0, "pending": 0, "failed_attempts": 2}
    figures = summarise(receiver, (closed, closed + 60), outbox, retried={"c"})
    assert figures["notifications_received"] == 4
    assert figures["duplicates_received"] == 1
    assert figures["by_kind"] == {"firing": 2, "repeat": 1, "resolved": 1}
    assert figures["close_to_webhook_samples"] == 2  # a and b; c was retried, d is not a firing
    assert figures["close_to_webhook_max_s"] == 8.0
    assert figures["delivered_after_outage"] == 1
    assert figures["after_outage_close_to_webhook_max_s"] == 70.0
    assert figures["delivery_retries"] == 2


def test_influx_read_bench_times_each_read_of_whole_minutes(influx_db, tmp_path, capsys):
    from energy_pipeline.devtools.bench import influx_read
    from energy_pipeline.devtools.simulator import build_fleet, generate_points
    from energy_pipeline.devtools.telemetry_writer import write_points

    # 4 minutes of 20 devices from 12:00:30: 12:00 and 12:04 are partial, three minutes whole.
    start = datetime(2026, 11, 2, 12, 0, 30, tzinfo=UTC)
    write_points(influx_db, generate_points(build_fleet(20), to_ns(start), 240), "telemetry")
    out = tmp_path / "read.json"
    argv = ["--url", influx_db.url, "--database", influx_db.database, "--minutes", "3"]
    assert influx_read.main([*argv, "--repeat", "1", "--json", str(out)]) == 0

    figures = json.loads(out.read_text())
    minutes = ["2026-11-02T12:01", "2026-11-02T12:02", "2026-11-02T12:03"]
    reads = [k for k in figures if k not in ("database", "repeat")]
    assert reads[0] == "read_window, 1 slice" and "count(power_w)" in reads
    for read in reads:
        assert list(figures[read]) == minutes, read
        assert all(0 < s < 60 for s in figures[read].values()), read
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| median seconds | 12:01 | 12:02 | 12:03 |"
    assert len(table) == 2 + len(reads)

    empty = InfluxClient(influx_db.url, f"{influx_db.database}_none")
    empty.create_database()
    try:
        assert influx_read.main(["--url", empty.url, "--database", empty.database]) == 1
    finally:
        empty.query_json(f'DROP DATABASE "{empty.database}"')
