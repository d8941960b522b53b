"""The set-based paths of evaluation and episodes: breached rows picked by row number from a
frame whose columns are chunked differently, a minute's devices and registry read in one
answer, and episodes written in one statement that each keep their own outbox rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl

from energy_pipeline.alerts.evaluate import WindowEvaluation, read_values
from energy_pipeline.storage import connect
from energy_pipeline_tests.test_alert_evaluate import a_minute, put_minute, register
from energy_pipeline_tests.test_alert_lifecycle import HOT, HOUSEHOLDS, run_minutes, setup_rules


def test_breached_rows_are_the_filtered_rows_whatever_the_chunks():
    # Columns built from pieces of different sizes, as a concatenation of joins gives them.
    breached = pl.concat([pl.Series([True, False, True]), pl.Series([False, True])])
    rule_id = pl.concat([pl.Series(["a"]), pl.Series(["b", "c", "d", "e"])])
    value = pl.concat([pl.Series([1.0, 2.0]), pl.Series([3.0, None]), pl.Series([5.0])])
    results = pl.DataFrame({"rule_id": rule_id, "value": value, "breached": breached})
    assert results.n_chunks("all") != [1, 1, 1]
    ev = WindowEvaluation("1m", a_minute(), results)
    assert ev.breached.equals(results.filter(pl.col("breached")))
    assert ev.breached["rule_id"].to_list() == ["a", "c", "e"]


def test_a_minute_reads_rolled_up_and_registered_devices_apart(pg_dsn):
    minute = a_minute(20)
    with connect(pg_dsn) as conn:
        register(conn, {"d1": "h1", "silent": "h1"})
        # "stray" is rolled up but not registered; "silent" is registered and sent nothing
        put_minute(conn, minute, {"d1": 100.0, "stray": 50.0}, {"d1": "h1", "stray": "h9"})
        values = read_values(conn, "1m", minute)
    got = {(t, e, m): v for t, e, m, v in values.iter_rows()}
    assert got[("device", "d1", "power_w_avg")] == 100.0
    assert got[("device", "stray", "power_w_avg")] == 50.0
    assert got[("device", "silent", "silent")] == 1.0
    assert got[("device", "d1", "silent")] == 0.0
    assert ("device", "stray", "silent") not in got
    assert ("device", "silent", "power_w_avg") not in got
    assert got[("household", "h1", "power_w_avg")] == 100.0
    assert got[("household", "h9", "power_w_avg")] == 50.0
    # devices that reported (stray included) over registered devices
    assert got[("fleet", "fleet", "reporting_ratio")] == 2 / 2


def test_episodes_opened_together_keep_their_own_outbox_rows(pg_dsn):
    # One range opens, resolves and reopens d1's episode: two new episodes of one rule and
    # entity in one write, each with its own id, notifications and payload.
    start = a_minute(40)
    minutes = [start + timedelta(minutes=i) for i in range(8)]
    with connect(pg_dsn) as conn:
        rules = setup_rules(conn, HOT.replace("for: 3", "for: 1"))
        for i, m in enumerate(minutes):
            d1 = 2000.0 if i in (1, 2, 5, 6, 7) else 10.0
            put_minute(conn, m, {"d1": d1, "d2": 10.0}, HOUSEHOLDS)
        run_minutes(conn, rules, minutes, datetime.now(UTC))
        alerts = conn.execute(
            "SELECT alert_id, started_at, state FROM energy.alerts ORDER BY started_at"
        ).fetchall()
        rows = conn.execute(
            "SELECT o.kind, o.channel, a.started_at, (o.payload->>'started_at')::timestamptz, "
            "o.payload->>'kind' FROM energy.alert_outbox o JOIN energy.alerts a USING (alert_id) "
            "ORDER BY o.outbox_id"
        ).fetchall()
    assert [(s, state) for _, s, state in alerts] == [
        (minutes[1], "resolved"),
        (minutes[5], "firing"),
    ]
    assert alerts[0][0] != alerts[1][0]
    assert sorted((s, k, c) for k, c, s, _, _ in rows) == [
        (minutes[1], "firing", "log"),
        (minutes[1], "firing", "webhook"),
        (minutes[1], "resolved", "log"),
        (minutes[1], "resolved", "webhook"),
        (minutes[5], "firing", "log"),
        (minutes[5], "firing", "webhook"),
    ]
    assert all(started == in_payload and k == kind for k, _, started, in_payload, kind in rows)
