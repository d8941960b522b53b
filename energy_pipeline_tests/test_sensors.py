"""Sensors tick by tick against real servers: new minutes, catch-up, repairs and late data."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import dagster as dg
import psycopg
import pytest

from energy_pipeline.definitions import build_definitions
from energy_pipeline.defs.minute_rollups import sensors
from energy_pipeline.scheduling import MINUTE, parse_partition_key, partition_key
from energy_pipeline_tests.helpers import (
    base_minute,
    fetch_quarantine,
    fetch_rollups,
    materialize_minutes,
)

# In the past, so every minute the sensor requests at NOW already exists as a partition.
NOW = base_minute(1) + timedelta(seconds=15)


@pytest.fixture
def frozen_now(monkeypatch):
    monkeypatch.setattr(sensors, "utcnow", lambda: NOW)
    return NOW


def _tick(settings, name: str, instance: dg.DagsterInstance, cursor: str | None = None):
    defs = build_definitions(settings)
    sensor = defs.get_repository_def().get_sensor_def(name)
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources=defs.resources, definitions=defs
    )
    return sensor.evaluate_tick(context)


def _minutes_of(request: dg.RunRequest) -> list[datetime]:
    tags = request.tags
    if request.partition_key:
        return [parse_partition_key(request.partition_key)]
    first = parse_partition_key(tags["dagster/asset_partition_range_start"])
    last = parse_partition_key(tags["dagster/asset_partition_range_end"])
    return [first + i * MINUTE for i in range(int((last - first) / MINUTE) + 1)]


def _run(settings, request: dg.RunRequest, instance=None) -> None:
    minutes = _minutes_of(request)
    materialize_minutes(settings, minutes[0], minutes[-1], instance=instance)


def test_first_tick_requests_the_newest_settled_minute_with_a_stable_key(settings, frozen_now):
    instance = dg.DagsterInstance.ephemeral()
    settings = replace(settings, settle_seconds=10)
    result = _tick(settings, "minute_rollup_sensor", instance)
    assert [_minutes_of(r) for r in result.run_requests] == [[NOW.replace(second=0) - MINUTE]]
    again = _tick(settings, "minute_rollup_sensor", instance)
    assert [r.run_key for r in again.run_requests] == [r.run_key for r in result.run_requests]
    # Not settled yet: with a 20 s settle delay at hh:mm:15 the previous minute is not due.
    late_settle = _tick(replace(settings, settle_seconds=20), "minute_rollup_sensor", instance)
    assert [_minutes_of(r) for r in late_settle.run_requests] == [
        [NOW.replace(second=0) - 2 * MINUTE]
    ]


@pytest.mark.parametrize(("max_range", "runs"), [(60, 1), (10, 3), (7, 5)])
def test_thirty_minute_gap_is_caught_up_in_ranged_runs_without_gap_or_overlap(
    settings, frozen_now, max_range, runs
):
    instance = dg.DagsterInstance.ephemeral()
    settings = replace(settings, max_range_minutes=max_range)
    newest = NOW.replace(second=0) - MINUTE
    last_seen = newest - 30 * MINUTE
    cursor = json.dumps({"last": partition_key(last_seen), "repair_after": 1e12})
    result = _tick(settings, "minute_rollup_sensor", instance, cursor)
    covered = [m for r in result.run_requests for m in _minutes_of(r)]
    assert covered == [last_seen + i * MINUTE for i in range(1, 31)]
    assert len(result.run_requests) == runs
    assert json.loads(result.cursor)["last"] == partition_key(newest)
    # The next tick at the same time requests nothing new.
    assert not _tick(settings, "minute_rollup_sensor", instance, result.cursor).run_requests


def test_requests_execute_and_catch_up_writes_every_minute(settings, influx_db, frozen_now):
    """The sensor's ranged requests run as-is and leave one ledger row per minute."""
    instance = dg.DagsterInstance.ephemeral()
    newest = NOW.replace(second=0) - MINUTE
    cursor = json.dumps({"last": partition_key(newest - 12 * MINUTE), "repair_after": 1e12})
    result = _tick(replace(settings, max_range_minutes=5), "minute_rollup_sensor", instance, cursor)
    for request in result.run_requests:
        _run(settings, request, instance)
    with psycopg.connect(settings.pg_dsn) as conn:
        buckets = [
            r[0] for r in conn.execute("SELECT bucket FROM energy.rollup_minutes ORDER BY 1")
        ]
    assert buckets == [newest - i * MINUTE for i in range(11, -1, -1)]


def test_failed_minutes_are_requested_again_with_a_new_key(settings, influx_db, frozen_now):
    instance = dg.DagsterInstance.ephemeral()
    newest = NOW.replace(second=0) - MINUTE
    # Minutes newest-5 .. newest-1 were requested before; all but newest-3 were rolled up.
    for m in (newest - 5 * MINUTE, newest - 4 * MINUTE, newest - 2 * MINUTE, newest - MINUTE):
        materialize_minutes(settings, m, m)
    cursor = json.dumps(
        {"last": partition_key(newest - MINUTE), "since": partition_key(newest - 5 * MINUTE)}
    )
    result = _tick(settings, "minute_rollup_sensor", instance, cursor)
    by_origin = {r.tags[sensors.ORIGIN_TAG]: r for r in result.run_requests}
    assert _minutes_of(by_origin["minutes"]) == [newest]
    assert _minutes_of(by_origin["repair"]) == [newest - 3 * MINUTE]
    assert by_origin["repair"].run_key.startswith("repair:")
    # Backoff: an immediate second tick does not repeat the repair.
    again = _tick(settings, "minute_rollup_sensor", instance, result.cursor)
    assert not [r for r in again.run_requests if r.tags[sensors.ORIGIN_TAG] == "repair"]


def test_late_point_within_window_is_recomputed_after_next_tick(settings, influx_db, frozen_now):
    instance = dg.DagsterInstance.ephemeral()
    minute = NOW.replace(second=0) - 10 * MINUTE
    ns = int(minute.timestamp()) * 10**9
    influx_db.write_lines(
        [f"telemetry,device_id=d1,household_id=h1 power_w=100.0,energy_wh=0.5 {ns}"]
    )
    with psycopg.connect(settings.pg_dsn) as conn:
        conn.execute("INSERT INTO energy.devices (device_id, household_id) VALUES ('d1', 'h1')")
    materialize_minutes(settings, minute, minute)
    assert not _tick(settings, "late_data_sensor", instance).run_requests

    late_ns = ns + 30 * 10**9
    influx_db.write_lines(
        [f"telemetry,device_id=d1,household_id=h1 power_w=300.0,energy_wh=1.5 {late_ns}"]
    )
    result = _tick(settings, "late_data_sensor", instance)
    assert [_minutes_of(r) for r in result.run_requests] == [[minute]]
    _run(settings, result.run_requests[0], instance)
    assert fetch_rollups(settings.pg_dsn) == [("d1", minute, "h1", 2, 200.0, 100.0, 300.0, 2.0, 0)]
    assert not _tick(settings, "late_data_sensor", instance).run_requests


def test_points_of_a_device_registered_late_are_rolled_up_on_the_next_tick(
    settings, influx_db, frozen_now
):
    instance = dg.DagsterInstance.ephemeral()
    minute = NOW.replace(second=0) - 10 * MINUTE
    old = NOW.replace(second=0) - timedelta(seconds=settings.lateness_seconds) - 2 * MINUTE
    influx_db.write_lines(
        [f"telemetry,device_id=d9,household_id=h9 power_w=100.0,energy_wh=0.5 {ns}"
         for ns in (int(m.timestamp()) * 10**9 for m in (old, minute))]
    )  # fmt: skip
    for m in (old, minute):
        materialize_minutes(settings, m, m)
    assert fetch_rollups(settings.pg_dsn) == []
    assert len(fetch_quarantine(settings.pg_dsn)) == 2  # device_id: unknown device
    assert not _tick(settings, "late_data_sensor", instance).run_requests

    with psycopg.connect(settings.pg_dsn) as conn:
        conn.execute("INSERT INTO energy.devices (device_id, household_id) VALUES ('d9', 'h9')")
    # Within the lateness window the minute is rolled up again; the older one stays as it was.
    result = _tick(settings, "late_data_sensor", instance)
    assert [_minutes_of(r) for r in result.run_requests] == [[minute]]
    _run(settings, result.run_requests[0], instance)
    assert fetch_rollups(settings.pg_dsn) == [("d9", minute, "h9", 1, 100.0, 100.0, 100.0, 0.5, 0)]
    assert [q[0] for q in fetch_quarantine(settings.pg_dsn)] == [old]
    assert not _tick(settings, "late_data_sensor", instance).run_requests


def test_late_points_beyond_window_are_counted_not_recomputed(settings, influx_db, frozen_now):
    instance = dg.DagsterInstance.ephemeral()
    settings = replace(settings, lateness_seconds=5 * 60, late_audit_extra_seconds=3600)
    minute = NOW.replace(second=0) - 30 * MINUTE
    ns = int(minute.timestamp()) * 10**9
    materialize_minutes(settings, minute, minute)
    influx_db.write_lines(
        [f"telemetry,device_id=d1,household_id=h1 power_w=1.0,energy_wh=0.1 {ns + i * 10**9}"
         for i in range(3)]
    )  # fmt: skip
    result = _tick(settings, "late_data_sensor", instance)
    assert not result.run_requests
    with psycopg.connect(settings.pg_dsn) as conn:
        ignored = conn.execute(
            "SELECT late_points_ignored FROM energy.rollup_minutes WHERE bucket = %s", (minute,)
        ).fetchone()[0]
    assert ignored == 3


def test_partition_set_is_bounded_to_the_retention_window():
    from energy_pipeline.defs.minute_rollups.partitions import build_minute_partitions

    for days in (1, 30, 65):
        now = datetime(2026, 11, 24, 13, 37, 5, tzinfo=UTC)
        parts = build_minute_partitions(now, days)
        keys = parts.get_partition_keys(current_time=now)
        assert len(keys) <= (days + 1) * 1440 < 100_000
        first_day = (now - timedelta(days=days)).date()
        assert keys[0] == f"{first_day:%Y-%m-%d}-00:00"
        assert keys[-1] == "2026-11-24-13:36"  # the last closed minute, never an open one


def test_first_start_does_not_turn_history_into_repairs(settings, influx_db, monkeypatch):
    instance = dg.DagsterInstance.ephemeral()
    monkeypatch.setattr(sensors, "utcnow", lambda: NOW)
    first = _tick(settings, "minute_rollup_sensor", instance)
    for request in first.run_requests:
        _run(settings, request, instance)
    monkeypatch.setattr(sensors, "utcnow", lambda: NOW + MINUTE)
    second = _tick(settings, "minute_rollup_sensor", instance, first.cursor)
    assert [r.tags[sensors.ORIGIN_TAG] for r in second.run_requests] == ["minutes"]
    assert _minutes_of(second.run_requests[0]) == [NOW.replace(second=0)]


def test_between_full_scans_only_recent_minutes_are_checked(settings, influx_db, frozen_now):
    instance = dg.DagsterInstance.ephemeral()
    settings = replace(settings, late_recent_seconds=15 * 60, late_full_scan_seconds=900)
    recent, older = NOW.replace(second=0) - 10 * MINUTE, NOW.replace(second=0) - 40 * MINUTE
    with psycopg.connect(settings.pg_dsn) as conn:
        conn.execute("INSERT INTO energy.devices (device_id, household_id) VALUES ('d1', 'h1')")
    for minute in (recent, older):
        materialize_minutes(settings, minute, minute)
        ns = int(minute.timestamp()) * 10**9
        influx_db.write_lines(
            [f"telemetry,device_id=d1,household_id=h1 power_w=1.0,energy_wh=1.0 {ns}"]
        )
    just_scanned = json.dumps({"full_scan_at": NOW.timestamp() - 60})
    result = _tick(settings, "late_data_sensor", instance, just_scanned)
    assert [m for r in result.run_requests for m in _minutes_of(r)] == [recent]
    assert json.loads(result.cursor)["full_scan_at"] == NOW.timestamp() - 60
    result = _tick(settings, "late_data_sensor", instance, json.dumps({"full_scan_at": 0}))
    assert sorted(m for r in result.run_requests for m in _minutes_of(r)) == [older, recent]
    assert json.loads(result.cursor)["full_scan_at"] == NOW.timestamp()


def _ledger_rows(dsn: str, minutes: list[datetime]) -> None:
    """Ledger rows as a run writes them for minutes without points."""
    with psycopg.connect(dsn) as conn:
        conn.cursor().executemany(
            "INSERT INTO energy.rollup_minutes (bucket, points_read, power_w_points, "
            "energy_wh_points, duplicates_dropped, rejected, devices, computed_at) "
            "VALUES (%s, 0, 0, 0, 0, 0, 0, now())",
            [(m,) for m in minutes],
        )


def test_minute_older_than_the_lateness_window_without_a_ledger_row_is_repaired(
    settings, influx_db, frozen_now
):
    """A minute lost 2.5 hours ago (an outage longer than the lateness window) is repaired."""
    instance = dg.DagsterInstance.ephemeral()
    newest = NOW.replace(second=0) - MINUTE
    since = newest - timedelta(hours=3)
    hole = newest - timedelta(hours=2, minutes=30)
    with psycopg.connect(settings.pg_dsn) as conn:
        conn.execute("INSERT INTO energy.devices (device_id, household_id) VALUES ('d1', 'h1')")
    ns = int(hole.timestamp()) * 10**9
    influx_db.write_lines(
        [f"telemetry,device_id=d1,household_id=h1 power_w=100.0,energy_wh=0.5 {ns}"]
    )
    _ledger_rows(
        settings.pg_dsn, [since + i * MINUTE for i in range(180) if since + i * MINUTE != hole]
    )
    cursor = json.dumps({"last": partition_key(newest - MINUTE), "since": partition_key(since)})
    result = _tick(settings, "minute_rollup_sensor", instance, cursor)
    repairs = [r for r in result.run_requests if r.tags[sensors.ORIGIN_TAG] == "repair"]
    assert [_minutes_of(r) for r in repairs] == [[hole]]
    assert repairs[0].tags[sensors.MAX_RUNTIME_TAG] == str(settings.run_timeout_seconds)
    # Surfaced, not only repaired: the asset gets an observation naming the hole.
    (observation,) = result.asset_events
    assert observation.metadata["minutes_without_rollup"].value == 1
    assert partition_key(hole) == observation.metadata["oldest_minute_without_rollup"].value
    # Within the backoff the ledger is not scanned, and nothing is requested or observed again.
    quiet = _tick(settings, "minute_rollup_sensor", instance, result.cursor)
    assert not quiet.run_requests and not quiet.asset_events
    for request in result.run_requests:
        _run(settings, request, instance)
    assert fetch_rollups(settings.pg_dsn) == [("d1", hole, "h1", 1, 100.0, 100.0, 100.0, 0.5, 0)]
    # After the backoff the ledger is complete again: no repair, and the count goes back to 0.
    cursor = json.loads(result.cursor) | {"repair_after": 0}
    again = _tick(settings, "minute_rollup_sensor", instance, json.dumps(cursor))
    assert not [r for r in again.run_requests if r.tags[sensors.ORIGIN_TAG] == "repair"]
    assert again.asset_events[0].metadata["minutes_without_rollup"].value == 0


def _started_run(instance: dg.DagsterInstance, minute: datetime, started: datetime) -> str:
    """A rollup run of `minute` left STARTED since `started`, as a crash leaves it."""
    from dagster._core.events import DagsterEvent, DagsterEventType

    run = instance.add_run(
        dg.DagsterRun(
            job_name="__ephemeral_asset_job__",
            status=dg.DagsterRunStatus.NOT_STARTED,
            tags={sensors.ORIGIN_TAG: "minutes", "dagster/partition": partition_key(minute)},
        )
    )
    instance.run_storage.handle_run_event(
        run.run_id,
        DagsterEvent(DagsterEventType.RUN_START.value, job_name=run.job_name),
        update_timestamp=started,
    )
    return run.run_id


@pytest.mark.parametrize(("started_ago", "repaired"), [(60, False), (1200, True)])
def test_run_left_started_past_the_run_timeout_no_longer_blocks_its_repair(
    settings, frozen_now, started_ago, repaired
):
    instance = dg.DagsterInstance.ephemeral()
    newest = NOW.replace(second=0) - MINUTE
    lost = newest - 3 * MINUTE
    _started_run(instance, lost, NOW - timedelta(seconds=started_ago))
    assert instance.get_runs()[0].status == dg.DagsterRunStatus.STARTED
    _ledger_rows(settings.pg_dsn, [newest - i * MINUTE for i in range(1, 6) if i != 3])
    cursor = json.dumps(
        {"last": partition_key(newest - MINUTE), "since": partition_key(newest - 5 * MINUTE)}
    )
    result = _tick(
        replace(settings, run_timeout_seconds=900), "minute_rollup_sensor", instance, cursor
    )
    repairs = [
        _minutes_of(r) for r in result.run_requests if r.tags[sensors.ORIGIN_TAG] == "repair"
    ]
    assert repairs == ([[lost]] if repaired else [])
