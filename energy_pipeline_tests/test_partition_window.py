"""Partition window on a deployment never reloaded by hand: 90 days on, the minute partitions
stay within (retention days + 2) x 1,440, in the daemon and in the webserver."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest
import requests

from energy_pipeline.config import PROJECT_ROOT
from energy_pipeline.definitions import build_definitions
from energy_pipeline.defs.hierarchy.partitions import (
    HIERARCHY_DAYS,
    HIERARCHY_FIRST_DAY,
    hierarchy_start,
)
from energy_pipeline.defs.minute_rollups.partitions import build_minute_partitions
from energy_pipeline.defs.partition_window.sensors import DagsterWebserverResource
from energy_pipeline.devtools import dagster_stack
from energy_pipeline.devtools.services import free_port
from energy_pipeline.scheduling import (
    MINUTE,
    floor_minute,
    parse_partition_key,
    partition_key,
    partitions_start,
    stale_partition_starts,
)

ADVISED_MAX = 100_000
DAY = timedelta(days=1)
T0 = datetime(2026, 11, 28, 0, 48, 26, tzinfo=UTC)


def bound(retention_days: int) -> int:
    return (retention_days + 2) * 1440


def count_at(start: datetime, now: datetime) -> int:
    """Minute partitions from `start` up to the last closed minute at `now`."""
    return (floor_minute(now) - start) // MINUTE


@pytest.mark.parametrize(
    ("shown", "current", "stale"),
    [
        ({"a": T0 - DAY}, {"a": T0}, ["a"]),
        ({"a": T0}, {"a": T0}, []),
        ({"a": T0 + DAY}, {"a": T0}, []),  # the webserver already loaded newer code
        ({"a": None}, {"a": T0}, []),  # not shown there: nothing to reload
        ({}, {"a": T0, "b": T0}, []),
        ({"a": T0, "b": T0 - DAY}, {"a": T0, "b": T0}, ["b"]),
    ],
)
def test_stale_partition_starts(shown, current, stale):
    assert stale_partition_starts(shown, current) == stale


def test_hierarchy_start_rolls_at_utc_midnight_and_never_before_its_first_day():
    assert hierarchy_start(datetime(2026, 11, 28, 12, tzinfo=UTC)) == HIERARCHY_FIRST_DAY
    later = datetime(2028, 3, 5, 23, 59, tzinfo=UTC)
    assert hierarchy_start(later) == datetime(2027, 5, 10, tzinfo=UTC)
    assert hierarchy_start(later + 2 * MINUTE) == datetime(2027, 5, 11, tzinfo=UTC)
    # 5-minute partitions at the end of a day, loaded at its start: under the advised maximum.
    assert (HIERARCHY_DAYS + 1) * 288 < ADVISED_MAX


@pytest.mark.parametrize("retention_days", [1, 30, 65])
def test_ninety_days_without_a_reload_by_hand_stay_within_the_bound(retention_days):
    """Every 7 minutes for 90 days (crossing each midnight at a different offset): the daemon's
    code is at most a minute old (it restarts its code servers every 60 s), the webserver's is
    what the partition window sensor last had it reload."""
    webserver_loaded_at = T0
    reloads = 0
    now = T0
    while now < T0 + timedelta(days=90):
        now += 7 * MINUTE
        daemon_loaded_at = now - MINUTE
        current = {"minutes": partitions_start(daemon_loaded_at, retention_days)}
        shown = {"minutes": partitions_start(webserver_loaded_at, retention_days)}
        if stale_partition_starts(shown, current):  # a sensor tick
            webserver_loaded_at = now
            reloads += 1
        for loaded_at in (daemon_loaded_at, webserver_loaded_at):
            start = partitions_start(loaded_at, retention_days)
            assert count_at(start, now) <= bound(retention_days)
            assert start >= partitions_start(now, retention_days) - DAY
    assert reloads == 90  # once a day, after midnight
    # Without the reloads, one load at T0 would have grown by 90 days of minutes.
    assert count_at(partitions_start(T0, retention_days), now) > bound(retention_days) + 88 * 1440


# --- the same with a real webserver and the real sensors -------------------------------------


def _graphql(url: str, query: str) -> dict:
    response = requests.post(f"{url}/graphql", json={"query": query}, timeout=30)
    response.raise_for_status()
    return response.json()["data"]


def _shown(url: str) -> tuple[str, int]:
    """First key and number of partitions of device_rollup_1m in the webserver's UI."""
    node = _graphql(
        url,
        '{ assetNodeOrError(assetKey: {path: ["device_rollup_1m"]}) { ... on AssetNode {'
        " partitionKeyConnection(limit: 1, ascending: true) { results }"
        " partitionStats { numPartitions } } } }",
    )["assetNodeOrError"]
    first = node["partitionKeyConnection"]["results"][0]
    return first, node["partitionStats"]["numPartitions"]


def _wait_loaded(url: str, proc, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            entries = _graphql(
                url,
                "{ workspaceOrError { ... on Workspace { locationEntries { loadStatus"
                " locationOrLoadError { __typename } } } } }",
            )["workspaceOrError"]["locationEntries"]
            if entries and entries[0]["locationOrLoadError"]["__typename"] == "RepositoryLocation":
                return
        except requests.RequestException:
            pass
        time.sleep(0.25)
    pytest.fail(f"webserver did not load the code location\n{log.read_text()[-3000:]}")


@pytest.mark.e2e
def test_webserver_and_sensors_ninety_days_on(settings, dagster_db, tmp_path: Path):
    """A webserver loaded the code 90 days ago shows 90 days too many minute partitions; one
    tick of the partition window sensor (in code loaded now, as the daemon's is) has it reload,
    after which it shows the retention window only, and every minute the minute sensor requests
    exists as a partition there."""
    retention = settings.raw_retention_days
    clock = tmp_path / "clock_days"
    clock.write_text("-90")
    workspace = tmp_path / "workspace.yaml"
    module = PROJECT_ROOT / "energy_pipeline_tests" / "shifted_clock_definitions.py"
    workspace.write_text(
        "load_from:\n  - python_file:\n"
        f"      relative_path: {module}\n"
        f"      working_directory: {PROJECT_ROOT}\n"
        "      location_name: energy_pipeline\n"
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dagster_stack.dagster_env(
        dagster_stack.dagster_home(tmp_path / "dagster_home"),
        dagster_db,
        {
            "ENERGY_TEST_CLOCK_DAYS_FILE": str(clock),
            "INFLUXDB_URL": settings.influx_url,
            "INFLUXDB_DATABASE": settings.influx_database,
            "ENERGY_PG_DSN": settings.pg_dsn,
        },
    )
    log = tmp_path / "webserver.log"
    webserver = dagster_stack.start(dagster_stack.webserver_command(port, workspace), env, log)
    try:
        _wait_loaded(url, webserver, log)
        now = datetime.now(UTC)
        first, count = _shown(url)
        assert parse_partition_key(first) == partitions_start(now - 90 * DAY, retention)
        assert count > bound(retention) + 88 * 1440  # the problem: it grew for 90 days

        # 90 days on: the daemon's code server loads the code again every minute.
        clock.write_text("0")
        defs = build_definitions(replace(settings, webserver_url=url))
        instance = dg.DagsterInstance.ephemeral()
        window_sensor = defs.get_repository_def().get_sensor_def("partition_window_sensor")

        def tick() -> str:
            context = dg.build_sensor_context(
                instance=instance, resources=defs.resources, definitions=defs
            )
            return window_sensor.evaluate_tick(context).skip_message or ""

        assert "reloaded energy_pipeline in the webserver" in tick()
        now = datetime.now(UTC)
        first, count = _shown(url)
        start = partitions_start(now, retention)
        assert parse_partition_key(first) == start  # nothing older than the retention window
        assert count <= bound(retention)
        assert count == count_at(start, now)
        assert tick() == "the webserver shows the current partition window"

        # The minute sensor, its cursor 90 days old: catch-up and repairs stay inside the window.
        minute_sensor = defs.get_repository_def().get_sensor_def("minute_rollup_sensor")
        partitions = build_minute_partitions(now, retention)
        context = dg.build_sensor_context(
            instance=instance,
            resources=defs.resources,
            definitions=defs,
            cursor=json.dumps({"last": partition_key(floor_minute(now - 90 * DAY))}),
        )
        requests_made = minute_sensor.evaluate_tick(context).run_requests
        assert requests_made
        for request in requests_made:
            keys = (
                [request.partition_key]
                if request.partition_key
                else [
                    request.tags["dagster/asset_partition_range_start"],
                    request.tags["dagster/asset_partition_range_end"],
                ]
            )
            for key in keys:
                assert key is not None
                assert partitions.has_partition_key(key), key
                assert parse_partition_key(key) >= start
    finally:
        dagster_stack.stop(webserver)


def test_sensor_skips_when_no_webserver_answers(settings):
    defs = build_definitions(replace(settings, webserver_url=f"http://127.0.0.1:{free_port()}"))
    sensor = defs.get_repository_def().get_sensor_def("partition_window_sensor")
    context = dg.build_sensor_context(resources=defs.resources, definitions=defs)
    assert "not reachable" in (sensor.evaluate_tick(context).skip_message or "")
    assert isinstance(defs.resources["dagster_webserver"], DagsterWebserverResource)
