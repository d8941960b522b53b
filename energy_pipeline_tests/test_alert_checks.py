"""The alert checks through Dagster, against real InfluxDB and PostgreSQL: part of the run the
minute sensor requests, one result per partition with the firing entities, re-runs that notify
nothing new, catch-up ranges, delivery on the fast path, the blocking contract check."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import dagster as dg
import polars as pl
import psycopg
import pytest
from dagster._core.event_api import PartitionKeyFilter

from energy_pipeline.alerts.rules import apply_rules, parse_rules
from energy_pipeline.config import Settings
from energy_pipeline.definitions import build_definitions
from energy_pipeline.defs.alerts.checks import ALERT_RULES, CONTRACT, MINUTE_ROLLUP
from energy_pipeline.devtools.lineprotocol import encode_points
from energy_pipeline.influx import InfluxClient
from energy_pipeline.scheduling import partition_key
from energy_pipeline.storage import connect
from energy_pipeline_tests.helpers import base_minute, range_tags
from energy_pipeline_tests.test_alert_evaluate import register

NS = 1_000_000_000
RULES = (
    "rules:\n"
    "  - {id: ev-charger, kind: threshold, metric: power_w_avg, operator: '>', threshold: 11000,"
    " severity: critical, channels: [log]}\n"
)


def write_minute(influx: InfluxClient, minute: datetime, power: dict[str, float]) -> None:
    """One point a second for each device (household h1) at a constant power."""
    start = int(minute.timestamp()) * NS
    rows = [
        (start + s * NS, device, "h1", watts, watts / 3600, 230.0)
        for device, watts in power.items()
        for s in range(60)
    ]
    frame = pl.DataFrame(
        rows,
        schema={
            "time": pl.Int64,
            "device_id": pl.String,
            "household_id": pl.String,
            "power_w": pl.Float64,
            "energy_wh": pl.Float64,
            "voltage_v": pl.Float64,
        },
        orient="row",
    )
    influx.write_lines(encode_points(frame))


def minute_run(
    settings: Settings,
    instance: dg.DagsterInstance,
    first: datetime,
    last: datetime | None = None,
    checks_only: bool = False,
) -> dg.ExecuteInProcessResult:
    """What the minute sensor's RunRequest(asset_selection=[device_rollup_1m]) launches: the
    global asset job subset to that asset (its checks come with it), for one minute or a range;
    or only the asset's checks."""
    defs = build_definitions(settings)
    job = defs.resolve_implicit_global_asset_job_def()
    if checks_only:
        graph = defs.resolve_asset_graph()
        keys = {k for k in graph.asset_check_keys if k.asset_key == MINUTE_ROLLUP}
        subset = job.get_subset(asset_selection=set(), asset_check_selection=keys)
        # Without an asset, `partition_key=` finds no partitions to validate against (dagster
        # 1.13): the partition goes in as the run's tag.
        return subset.execute_in_process(
            tags={"dagster/partition": partition_key(first)},
            instance=instance,
            raise_on_error=False,
        )
    else:
        subset = job.get_subset(asset_selection={MINUTE_ROLLUP})
    if last is None or last == first:
        return subset.execute_in_process(
            partition_key=partition_key(first), instance=instance, raise_on_error=False
        )
    return subset.execute_in_process(
        tags=range_tags(first, last), instance=instance, raise_on_error=False
    )


def evaluations(result: dg.ExecuteInProcessResult, name: str) -> list[dg.AssetCheckEvaluation]:
    return [e for e in result.get_asset_check_evaluations() if e.check_name == name]


@pytest.fixture
def fleet(settings: Settings) -> Settings:
    with connect(settings.pg_dsn) as conn:
        register(conn, {"charger": "h1", "fridge": "h1"})
        apply_rules(conn, parse_rules(RULES))
    return settings


def outbox(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT entity, kind, channel, delivered_at IS NOT NULL, suppressed "
            "FROM energy.alert_outbox ORDER BY outbox_id"
        ).fetchall()


def test_the_minute_run_evaluates_rules_per_partition_and_delivers(fleet, influx_db):
    minute = base_minute(20)
    write_minute(influx_db, minute, {"charger": 11500.0, "fridge": 90.0})
    instance = dg.DagsterInstance.ephemeral()
    result = minute_run(fleet, instance, minute)
    assert result.success
    materialized = {e.asset_key for e in result.get_asset_materialization_events()}
    assert materialized == {MINUTE_ROLLUP}  # the minute only: no other asset joined the run

    [rules] = evaluations(result, ALERT_RULES["1m"])
    assert rules.partition == partition_key(minute) and not rules.passed
    assert rules.severity == dg.AssetCheckSeverity.WARN
    meta = {k: v.value for k, v in rules.metadata.items()}
    assert meta["conditions_true"] == 1 and meta["rules_true"] == {"ev-charger": 1}
    assert [(f["entity"], f["value"]) for f in meta["firing"]] == [("charger", 11500.0)]
    assert meta["applied_to_episodes"] is True
    [contract] = evaluations(result, CONTRACT["1m"])
    assert contract.passed and contract.partition == partition_key(minute)

    # delivered in the same run by the log channel (fast path)
    assert outbox(fleet.pg_dsn) == [("charger", "firing", "log", True, None)]

    # the same minute again: evaluated and reported, nothing new notified
    again = minute_run(fleet, instance, minute)
    [rerun] = evaluations(again, ALERT_RULES["1m"])
    assert not rerun.passed and rerun.metadata["applied_to_episodes"].value is False
    assert outbox(fleet.pg_dsn) == [("charger", "firing", "log", True, None)]


def test_a_ranged_run_reports_each_minute_and_notifies_only_open_episodes(fleet, influx_db):
    first = base_minute(30)
    draws = [11500.0, 50.0, 50.0, 12000.0]  # an episode over at once, then one still open
    for i, watts in enumerate(draws):
        write_minute(influx_db, first + timedelta(minutes=i), {"charger": watts, "fridge": 90.0})
    last = first + timedelta(minutes=len(draws) - 1)
    instance = dg.DagsterInstance.ephemeral()
    result = minute_run(fleet, instance, first, last)
    assert result.success
    # the instance keeps one check execution per minute partition, with its own verdict
    check = dg.AssetCheckKey(MINUTE_ROLLUP, ALERT_RULES["1m"])
    statuses = []
    for i in range(len(draws)):
        key = partition_key(first + timedelta(minutes=i))
        latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [check], partition_filter=PartitionKeyFilter(key=key)
        )[check]
        assert latest.partition == key
        statuses.append(latest.status.value)
    assert statuses == ["FAILED", "SUCCEEDED", "SUCCEEDED", "FAILED"]
    found = evaluations(result, ALERT_RULES["1m"])
    assert [e.partition for e in found] == [
        partition_key(first + timedelta(minutes=i)) for i in range(len(draws))
    ]
    assert [e.passed for e in found] == [False, True, True, False]
    assert "catch-up of 4 windows" in found[0].metadata["summary"].value
    assert len(evaluations(result, CONTRACT["1m"])) == len(draws)
    rows = outbox(fleet.pg_dsn)
    sent = [r for r in rows if r[4] is None]
    assert [(r[0], r[1], r[3]) for r in sent] == [("charger", "firing", True)]
    assert sorted(r[1] for r in rows if r[4] is not None) == ["firing", "resolved"]


def test_the_blocking_contract_check_fails_on_a_tampered_row(fleet, influx_db):
    minute = base_minute(25)
    write_minute(influx_db, minute, {"charger": 500.0, "fridge": 90.0})
    instance = dg.DagsterInstance.ephemeral()
    assert minute_run(fleet, instance, minute).success
    with psycopg.connect(fleet.pg_dsn) as conn:
        conn.execute(
            "UPDATE energy.device_rollup_1m SET power_w_min = power_w_max + 5 "
            "WHERE device_id = 'fridge' AND bucket = %s",
            (minute,),
        )
    result = minute_run(fleet, instance, minute, checks_only=True)
    assert not result.success  # a failed blocking check fails its step
    [contract] = evaluations(result, CONTRACT["1m"])
    assert not contract.passed and contract.blocking
    assert contract.metadata["violations"].value == 1
    assert contract.partition == partition_key(minute)


def test_five_minute_rules_run_with_the_hierarchy_job(settings):
    from energy_pipeline.defs.hierarchy.partitions import FIVE_MINUTE_PARTITIONS
    from energy_pipeline_tests.test_alert_evaluate import put_minute

    households = {"oven": "h1", "lamp": "h2"}
    minute = base_minute(40)  # read once: two readings may straddle a minute
    window = minute.replace(minute=minute.minute // 5 * 5)
    with connect(settings.pg_dsn) as conn:
        register(conn, households)
        apply_rules(
            conn,
            parse_rules(
                "rules:\n  - {id: house-draw, kind: threshold, scope: household, window: 5m,"
                " metric: power_w_avg, operator: '>', threshold: 2000, channels: [log]}\n"
            ),
        )
        for i in range(5):
            put_minute(
                conn, window + timedelta(minutes=i), {"oven": 3000.0, "lamp": 40.0}, households
            )
    defs = build_definitions(settings)
    key = FIVE_MINUTE_PARTITIONS.get_partition_key_for_timestamp(window.timestamp())
    result = defs.resolve_job_def("household_rollup_5m_job").execute_in_process(
        partition_key=key, instance=dg.DagsterInstance.ephemeral()
    )
    assert result.success
    [rules] = evaluations(result, ALERT_RULES["5m"])
    assert rules.partition == key and not rules.passed
    firing = rules.metadata["firing"].value
    assert [(f["entity"], f["value"]) for f in firing] == [("h1", 3000.0)]
    [contract] = evaluations(result, CONTRACT["5m"])
    assert contract.passed and contract.metadata["rows"].value == 2
    assert outbox(settings.pg_dsn) == [("h1", "firing", "log", True, None)]


def test_the_contract_names_schema_drift_and_impossible_rows(pg_dsn):
    from energy_pipeline.alerts.contracts import check_contract
    from energy_pipeline_tests.test_alert_evaluate import put_minute

    minute = base_minute(10)
    step = timedelta(minutes=1)
    with connect(pg_dsn) as conn:
        put_minute(conn, minute, {"a": 10.0, "b": 20.0}, {"a": "h1", "b": "h1"})
        [ok] = check_contract(conn, "device_rollup_1m", [minute], step)
        assert ok.passed and ok.rows == 2
        conn.execute(
            "UPDATE energy.device_rollup_1m SET power_w_avg = power_w_max * 2 WHERE device_id = 'b'"
        )
        [bad] = check_contract(conn, "device_rollup_1m", [minute], step)
        assert (bad.passed, bad.violations, bad.examples) == (False, 1, ["b"])
        conn.execute("DROP VIEW energy.bi_device_minute")  # it reads the columns changed
        conn.execute("ALTER TABLE energy.device_rollup_1m DROP COLUMN voltage_v_max")
        conn.execute("ALTER TABLE energy.device_rollup_1m ALTER COLUMN power_w_max TYPE real")
        [drift] = check_contract(conn, "device_rollup_1m", [minute], step)
    assert not drift.passed
    assert drift.schema_problems == [
        "column power_w_max is real, expected double precision",
        "column voltage_v_max is missing",
    ]


def test_the_minute_sensors_request_runs_the_alert_checks(fleet, influx_db, monkeypatch):
    from energy_pipeline.defs.minute_rollups import sensors

    minute = base_minute(3)
    write_minute(influx_db, minute, {"charger": 11800.0, "fridge": 90.0})
    monkeypatch.setattr(sensors, "utcnow", lambda: minute + timedelta(minutes=1, seconds=15))
    defs = build_definitions(fleet)
    instance = dg.DagsterInstance.ephemeral()
    sensor = defs.get_repository_def().get_sensor_def("minute_rollup_sensor")
    context = dg.build_sensor_context(instance=instance, resources=defs.resources, definitions=defs)
    [request] = sensor.evaluate_tick(context).run_requests
    assert request.asset_selection == [MINUTE_ROLLUP] and request.asset_check_keys is None
    # what the daemon launches for it: the asset job subset to the request's selection
    job = defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_selection=set(request.asset_selection), asset_check_selection=None
    )
    result = job.execute_in_process(
        partition_key=request.partition_key, tags=request.tags, instance=instance
    )
    assert result.success
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert set(checks) == {ALERT_RULES["1m"], CONTRACT["1m"]}
    assert checks[ALERT_RULES["1m"]].partition == partition_key(minute)
    assert outbox(fleet.pg_dsn) == [("charger", "firing", "log", True, None)]


def test_out_of_order_minutes_wait_and_a_hole_is_skipped_and_reported(fleet, influx_db):
    instance = dg.DagsterInstance.ephemeral()
    m0, m1, m2 = (base_minute(6) + timedelta(minutes=i) for i in range(3))
    for minute in (m0, m1, m2):
        write_minute(influx_db, minute, {"charger": 11500.0, "fridge": 90.0})
    assert minute_run(fleet, instance, m0).success
    # minute 2 finishes first: it waits for minute 1 and notifies nothing yet
    [waiting] = evaluations(minute_run(fleet, instance, m2), ALERT_RULES["1m"])
    assert waiting.metadata["waiting_for_older_window"].value is True
    assert waiting.metadata["applied_to_episodes"].value is False
    # minute 1's run applies minute 1, then the waiting minute 2 from its stored rows
    [late] = evaluations(minute_run(fleet, instance, m1), ALERT_RULES["1m"])
    assert late.metadata["applied_to_episodes"].value is True
    with psycopg.connect(fleet.pg_dsn) as conn:
        assert conn.execute("SELECT last_bucket FROM energy.alert_evaluations").fetchone() == (m2,)

    # A hole older than the bound (minute n1 never rolled up) is skipped, reported and logged.
    n0 = base_minute(40)
    n2 = n0 + timedelta(minutes=2)
    with psycopg.connect(fleet.pg_dsn) as conn:
        conn.execute("UPDATE energy.alert_evaluations SET last_bucket = %s", (n0,))
    write_minute(influx_db, n2, {"charger": 11500.0, "fridge": 90.0})
    result = minute_run(fleet, instance, n2)
    [skipped] = evaluations(result, ALERT_RULES["1m"])
    hole = f"{n0 + timedelta(minutes=1):%Y-%m-%d %H:%M}"
    assert skipped.metadata["missing_windows_skipped"].value == [f"{hole}..{hole}"]
    assert skipped.metadata["applied_to_episodes"].value is True
    warnings = [
        e.user_message
        for e in instance.all_logs(result.run_id)
        if e.level == logging.WARNING and "never rolled up" in e.user_message
    ]
    assert len(warnings) == 1 and hole in warnings[0]
