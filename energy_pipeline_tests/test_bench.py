"""The benchmark's quick mode runs against the real servers and yields well-formed figures.

Only shape and sanity are checked here; timings are never asserted.
"""

from __future__ import annotations

import json
from dataclasses import replace

from energy_pipeline.bench import BenchOptions, BenchTargets, format_table, run_bench


def test_quick_bench_produces_complete_sane_figures(settings, influx_db):
    # Quick mode, plus a 2-minute ranged run so the child-process path is exercised too.
    opts = replace(BenchOptions.quick(), long_minutes=2)
    targets = BenchTargets(settings.influx_url, influx_db.database, settings.pg_dsn)
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
    for table in ("rollup", "raw"):
        reads = figures["reads"][table]
        assert reads["queries"] > 0
        assert 0 < reads["p50_ms"] <= reads["p95_ms"] <= reads["p99_ms"]
    assert figures["reads"]["minutes_rewritten_meanwhile"] > 0
    assert [r["devices"] for r in figures["scaling"]] == list(opts.scaling)
    assert [r["points"] for r in figures["scaling"]] == [n * 60 for n in opts.scaling]
    assert figures["scaling_spread"] >= 1.0
    table = format_table(result)
    assert "fresh minute: in-asset total" in table and "history minute: read" in table
    assert "reads on raw" in table
    assert any("loaded" in m for m in messages)
