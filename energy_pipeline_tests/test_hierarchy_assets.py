"""The hierarchy's Dagster assets, checks and sensor against real InfluxDB and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dagster as dg
import polars as pl
import psycopg
import pytest

from energy_pipeline import storage
from energy_pipeline.config import Settings
from energy_pipeline.definitions import build_definitions
from energy_pipeline.defs.hierarchy import build_defs
from energy_pipeline.defs.hierarchy.assets import (
    MINUTE_ROLLUP,
    device_rollup_1h,
    household_rollup_5m,
)
from energy_pipeline.defs.hierarchy.checks import (
    HIERARCHY_CHECKS,
    MINUTES_COVERED,
    SUMS_MATCH_MINUTES,
)
from energy_pipeline.defs.hierarchy.partitions import FIVE_MINUTE_PARTITIONS, HOURLY_PARTITIONS
from energy_pipeline.defs.hierarchy.sensors import GRAIN_TAG, build_hierarchy_sensor
from energy_pipeline.devtools.lineprotocol import encode_points
from energy_pipeline.devtools.simulator import build_fleet, generate_points
from energy_pipeline.hierarchy import DEVICE_1H, HOUSEHOLD_5M
from energy_pipeline.resources import PostgresResource
from energy_pipeline.scheduling import PARTITION_FMT, parse_partition_key
from energy_pipeline_tests.helpers import close, materialize_minutes
from energy_pipeline_tests.test_hierarchy import (
    closed_hour,
    insert_minutes,
    register,
    synthetic_minutes,
)

FIVE = timedelta(minutes=5)
HOUR = timedelta(hours=1)
NS = 1_000_000_000
ASSETS = {HOUSEHOLD_5M: household_rollup_5m, DEVICE_1H: device_rollup_1h}
PARTITIONS = {HOUSEHOLD_5M: FIVE_MINUTE_PARTITIONS, DEVICE_1H: HOURLY_PARTITIONS}


def checks_of(asset: dg.AssetsDefinition) -> list[dg.AssetChecksDefinition]:
    return [c for c in HIERARCHY_CHECKS if next(iter(c.check_keys)).asset_key == asset.key]


def run(
    dsn: str,
    grain: str,
    partition_key: str | None = None,
    tags: dict[str, str] | None = None,
    instance: dg.DagsterInstance | None = None,
) -> dg.ExecuteInProcessResult:
    """Materialize one grain (and its checks) for a partition, or a range given in `tags`."""
    asset = ASSETS[grain]
    return dg.materialize(
        [asset, *checks_of(asset)],
        resources={"postgres": PostgresResource(dsn=dsn)},
        partition_key=partition_key,
        tags=tags,
        instance=instance,
        raise_on_error=False,
    )


def run_checks_only(dsn: str, grain: str, partition_key: str) -> dg.ExecuteInProcessResult:
    """Evaluate a partition's checks without materializing the asset again."""
    asset = ASSETS[grain]
    job = dg.define_asset_job(
        "hierarchy_checks_only",
        selection=dg.AssetSelection.checks_for_assets(asset),
        partitions_def=PARTITIONS[grain],
    )
    defs = dg.Definitions(
        assets=[asset],
        asset_checks=checks_of(asset),
        jobs=[job],
        resources={"postgres": PostgresResource(dsn=dsn)},
    )
    # `partition_key=` validates against the selected *assets* (none here: dagster 1.13 raises
    # "no PartitionsDefinition shared"), so the partition goes in as the run's tag.
    return defs.resolve_job_def(job.name).execute_in_process(
        tags={"dagster/partition": partition_key}, raise_on_error=False
    )


def evaluations(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def key(ts: datetime) -> str:
    return ts.strftime(PARTITION_FMT)


@pytest.fixture
def minutes_hour(pg_dsn: str) -> datetime:
    """A closed hour of synthetic minute rows, every minute in the ledger."""
    hour = closed_hour()
    with storage.connect(pg_dsn) as conn:
        register(conn)
        insert_minutes(conn, synthetic_minutes(hour, 60), hour + HOUR)
    return hour


def test_definitions_load_with_lineage_to_the_minute_asset():
    defs = build_defs()
    graph = dg.Definitions.merge(
        defs,
        dg.Definitions(
            assets=[dg.AssetSpec("device_rollup_1m")],
            resources={"postgres": PostgresResource(dsn="postgresql://127.0.0.1/unused")},
        ),
    )
    assert {j.name for j in graph.resolve_all_job_defs()} >= {
        "household_rollup_5m_job",
        "device_rollup_1h_job",
    }
    assert graph.resolve_sensor_def("hierarchy_sensor")
    graph = graph.resolve_asset_graph()
    for grain in (HOUSEHOLD_5M, DEVICE_1H):
        assert graph.get(dg.AssetKey(grain)).parent_keys == {dg.AssetKey("device_rollup_1m")}
    assert {k.name for k in graph.asset_check_keys} == {SUMS_MATCH_MINUTES, MINUTES_COVERED}
    blocking = {s.name for c in HIERARCHY_CHECKS for s in c.check_specs if s.blocking}
    assert blocking == {SUMS_MATCH_MINUTES}


@pytest.mark.parametrize(("grain", "minutes"), [(HOUSEHOLD_5M, 5), (DEVICE_1H, 60)])
def test_a_window_maps_to_exactly_its_minute_partitions(grain, minutes):
    graph = build_definitions(Settings.from_env({})).resolve_asset_graph()
    window = closed_hour() + (FIVE if grain == HOUSEHOLD_5M else timedelta(0))

    mapped = graph.get_parent_partition_keys_for_child(
        key(window), MINUTE_ROLLUP, dg.AssetKey(grain)
    )

    expected = [key(window + i * timedelta(minutes=1)) for i in range(minutes)]
    assert list(mapped.partitions_subset.get_partition_keys()) == expected
    assert mapped.required_but_nonexistent_partition_keys == []


@pytest.mark.parametrize("grain", [HOUSEHOLD_5M, DEVICE_1H])
def test_a_window_older_than_the_minute_partitions_maps_to_none(grain):
    graph = build_definitions(Settings.from_env({})).resolve_asset_graph()
    first = PARTITIONS[grain].get_first_partition_key()
    minute_partitions = graph.get(MINUTE_ROLLUP).partitions_def
    assert minute_partitions is not None
    assert parse_partition_key(first) < parse_partition_key(
        minute_partitions.get_first_partition_key()
    )

    mapped = graph.get_parent_partition_keys_for_child(first, MINUTE_ROLLUP, dg.AssetKey(grain))

    # Nothing is required of minutes retention removed: such a window is not refused for them.
    assert list(mapped.partitions_subset.get_partition_keys()) == []
    assert mapped.required_but_nonexistent_partition_keys == []


@pytest.mark.parametrize("grain", [HOUSEHOLD_5M, DEVICE_1H])
def test_partition_materializes_and_checks_pass(pg_dsn, minutes_hour, grain):
    result = run(pg_dsn, grain, partition_key=key(minutes_hour))

    assert result.success
    checks = evaluations(result)
    assert checks[SUMS_MATCH_MINUTES].passed and checks[MINUTES_COVERED].passed
    assert checks[SUMS_MATCH_MINUTES].partition == key(minutes_hour)
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    assert meta["minutes_covered"].value == meta["minutes_expected"].value
    assert meta["rows_written"].value > 0
    sums = checks[SUMS_MATCH_MINUTES].metadata
    assert close(sums["energy_wh"].value, sums["minute_energy_wh"].value)


def test_ranged_run_covers_every_window_in_one_run(pg_dsn, minutes_hour):
    last = minutes_hour + HOUR - FIVE
    tags = {
        "dagster/asset_partition_range_start": key(minutes_hour),
        "dagster/asset_partition_range_end": key(last),
    }
    # The second window lacks two of its minutes in the ledger.
    with psycopg.connect(pg_dsn) as conn:
        conn.execute(
            "DELETE FROM energy.rollup_minutes WHERE bucket IN (%s, %s)",
            (minutes_hour + timedelta(minutes=7), minutes_hour + timedelta(minutes=8)),
        )
    result = run(pg_dsn, HOUSEHOLD_5M, tags=tags)

    assert result.success
    events = result.get_asset_materialization_events()
    assert len(events) == 12
    # Each window's materialization carries that window's own figures, not the run's totals.
    with psycopg.connect(pg_dsn) as conn:
        rows = dict(
            conn.execute(
                "SELECT bucket, count(*) FROM energy.household_rollup_5m GROUP BY bucket"
            ).fetchall()
        )
    figures = {
        e.partition: {k: e.materialization.metadata[k].value for k in ("rows_written",
                      "minutes_covered", "minutes_expected")}
        for e in events
    }  # fmt: skip
    assert figures == {
        key(w): {
            "rows_written": rows[w],
            "minutes_covered": 3 if w == minutes_hour + FIVE else 5,
            "minutes_expected": 5,
        }
        for w in (minutes_hour + i * FIVE for i in range(12))
    }
    # One check result per window, each with its own partition, even in a ranged run.
    sums = [e for e in result.get_asset_check_evaluations() if e.check_name == SUMS_MATCH_MINUTES]
    assert sorted(e.partition for e in sums) == [key(minutes_hour + i * FIVE) for i in range(12)]
    assert all(e.passed for e in sums)
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute(
            "SELECT count(DISTINCT bucket) FROM energy.household_rollup_5m"
        ).fetchone() == (12,)


@pytest.mark.parametrize("grain", [HOUSEHOLD_5M, DEVICE_1H])
def test_tampered_minute_row_fails_the_blocking_check(pg_dsn, minutes_hour, grain):
    partition = key(minutes_hour)
    assert run(pg_dsn, grain, partition_key=partition).success
    with psycopg.connect(pg_dsn) as conn:
        conn.execute(
            "UPDATE energy.device_rollup_1m SET energy_wh_sum = energy_wh_sum + 1.25 "
            "WHERE (device_id, bucket) = (SELECT device_id, bucket FROM energy.device_rollup_1m "
            "WHERE bucket >= %s ORDER BY bucket, device_id LIMIT 1)",
            (minutes_hour,),
        )

    # only the checks run, against the rollup written before the minute row changed
    result = run_checks_only(pg_dsn, grain, partition)

    assert not result.get_asset_materialization_events()
    sums = evaluations(result)[SUMS_MATCH_MINUTES]
    assert not sums.passed
    assert sums.severity == dg.AssetCheckSeverity.ERROR
    assert sums.partition == partition
    meta = sums.metadata
    assert close(meta["minute_energy_wh"].value - meta["energy_wh"].value, 1.25)
    assert not result.success  # a failed blocking check fails its step


def test_incomplete_window_warns_through_the_coverage_check(pg_dsn, minutes_hour):
    with psycopg.connect(pg_dsn) as conn:
        conn.execute(
            "DELETE FROM energy.rollup_minutes WHERE bucket = %s",
            (minutes_hour + timedelta(minutes=2),),
        )
    result = run(pg_dsn, HOUSEHOLD_5M, partition_key=key(minutes_hour))

    checks = evaluations(result)
    assert result.success and checks[SUMS_MATCH_MINUTES].passed
    assert not checks[MINUTES_COVERED].passed
    assert checks[MINUTES_COVERED].severity == dg.AssetCheckSeverity.WARN
    assert checks[MINUTES_COVERED].metadata["minutes_covered"].value == 4


def execute(dsn: str, request: dg.RunRequest, instance: dg.DagsterInstance) -> None:
    grain = request.tags[GRAIN_TAG]
    assert request.job_name == f"{grain}_job"
    result = run(dsn, grain, request.partition_key, dict(request.tags), instance)
    assert result.success


def windows(requests: list[dg.RunRequest]) -> set[tuple[str, str, str]]:
    out = set()
    for r in requests:
        first = r.partition_key or r.tags["dagster/asset_partition_range_start"]
        last = r.partition_key or r.tags["dagster/asset_partition_range_end"]
        out.add((r.tags[GRAIN_TAG], first, last))
    return out


def household_energy(dsn: str, bucket: datetime) -> float:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT sum(energy_wh_sum) FROM energy.household_rollup_5m WHERE bucket = %s",
            (bucket,),
        ).fetchone()
    return float(row[0]) if row and row[0] is not None else 0.0


def device_hour_energy(dsn: str, hour: datetime) -> float:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT sum(energy_wh_sum) FROM energy.device_rollup_1h WHERE bucket = %s", (hour,)
        ).fetchone()
    return float(row[0]) if row and row[0] is not None else 0.0


def test_sensor_rolls_up_ready_windows_and_propagates_a_late_minute(settings, influx_db):
    """Minutes from InfluxDB through the minute asset; the sensor requests the coarse windows,
    and a minute recomputed for a late point makes its 5-minute and hourly windows recompute on
    the very next tick."""
    fleet = build_fleet(12, seed=11, devices_per_household=4)
    with psycopg.connect(settings.pg_dsn) as conn:
        storage.upsert_devices(conn, fleet)
    hour = closed_hour(1)
    points = generate_points(fleet, int(hour.timestamp()) * NS, 6 * 60, seed=11)
    influx_db.write_lines(encode_points(points))
    instance = dg.DagsterInstance.ephemeral()
    materialize_minutes(settings, hour, hour + timedelta(minutes=5), instance=instance)

    # lateness 0: a closed window goes with what exists (the hour holds 6 of its 60 minutes)
    sensor = build_hierarchy_sensor(lateness_seconds=0)
    resources = {"postgres": PostgresResource(dsn=settings.pg_dsn)}

    def tick() -> list[dg.RunRequest]:
        context = dg.build_sensor_context(instance=instance, resources=resources)
        result = sensor(context)
        assert isinstance(result, dg.SensorResult)
        return list(result.run_requests or [])

    first = tick()
    assert windows(first) == {
        (HOUSEHOLD_5M, key(hour), key(hour + FIVE)),  # contiguous windows: one ranged run
        (DEVICE_1H, key(hour), key(hour)),
    }
    for request in first:
        execute(settings.pg_dsn, request, instance)
    assert tick() == []  # nothing changed, nothing requested
    before_5m, before_1h = (
        household_energy(settings.pg_dsn, hour),
        device_hour_energy(settings.pg_dsn, hour),
    )

    # a late point for minute hour+2 of a registered device; the minute is recomputed
    late = pl.DataFrame(
        {
            "time": [int((hour + timedelta(minutes=2, seconds=30)).timestamp()) * NS + 123],
            "device_id": [fleet["device_id"][0]],
            "household_id": [fleet["household_id"][0]],
            "power_w": [1800.0],
            "energy_wh": [0.5],
            "voltage_v": [230.0],
        }
    )
    influx_db.write_lines(encode_points(late))
    materialize_minutes(
        settings, hour + timedelta(minutes=2), hour + timedelta(minutes=2), instance=instance
    )

    second = tick()
    assert windows(second) == {
        (HOUSEHOLD_5M, key(hour), key(hour)),
        (DEVICE_1H, key(hour), key(hour)),
    }
    assert {r.run_key for r in second}.isdisjoint({r.run_key for r in first})
    for request in second:
        execute(settings.pg_dsn, request, instance)
    assert close(household_energy(settings.pg_dsn, hour), before_5m + 0.5)
    assert close(device_hour_energy(settings.pg_dsn, hour), before_1h + 0.5)
    assert tick() == []


def test_sensor_waits_for_a_windows_last_minute(settings, pg_dsn):
    """A window with a minute missing is not requested while its lateness window runs."""
    hour = closed_hour(1)
    with storage.connect(pg_dsn) as conn:
        register(conn)
        rows = [
            r for r in synthetic_minutes(hour, 10) if r["bucket"] != hour + timedelta(minutes=7)
        ]
        insert_minutes(conn, rows, datetime.now(UTC))
    sensor = build_hierarchy_sensor(lateness_seconds=4 * 3600)
    context = dg.build_sensor_context(
        instance=dg.DagsterInstance.ephemeral(),
        resources={"postgres": PostgresResource(dsn=pg_dsn)},
    )
    result = sensor(context)
    assert isinstance(result, dg.SensorResult)
    assert windows(list(result.run_requests or [])) == {(HOUSEHOLD_5M, key(hour), key(hour))}
