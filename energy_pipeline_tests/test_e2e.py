"""End to end: devices write live and the Dagster daemon's sensor rolls minutes up by itself."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg
import pytest

from energy_pipeline.config import dagster_storage_url
from energy_pipeline.devtools import dagster_stack
from energy_pipeline.devtools.telemetry_writer import SimulationOptions, run_live

pytestmark = pytest.mark.e2e
DEVICES = 10


def _full_minutes(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT bucket, count(*), min(sample_count), max(sample_count) "
            "FROM energy.device_rollup_1m GROUP BY bucket "
            "HAVING count(*) = %s AND min(sample_count) = 60 ORDER BY bucket",
            (DEVICES,),
        ).fetchall()


def test_daemon_sensor_rolls_up_live_minutes(settings, dagster_db, tmp_path: Path):
    home = dagster_stack.dagster_home(tmp_path / "dagster_home")
    env = dagster_stack.dagster_env(
        home,
        dagster_db,
        {
            "INFLUXDB_URL": settings.influx_url,
            "INFLUXDB_DATABASE": settings.influx_database,
            "ENERGY_PG_DSN": settings.pg_dsn,
            "ENERGY_SETTLE_SECONDS": "2",
        },
    )
    stop = threading.Event()
    writer = threading.Thread(
        target=lambda: run_live(
            _client(settings), settings, SimulationOptions(devices=DEVICES), 300, stop
        ),
        daemon=True,
    )
    writer.start()
    daemon = dagster_stack.start_daemon(env, tmp_path / "daemon.log")
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not _full_minutes(settings.pg_dsn):
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
            time.sleep(0.5)
        full = _full_minutes(settings.pg_dsn)
        assert full, (tmp_path / "daemon.log").read_text()[-3000:]
        with psycopg.connect(dagster_storage_url(dagster_db).replace("+psycopg2", "")) as conn:
            keys = [r[0] for r in conn.execute(
                "SELECT value FROM run_tags WHERE key = 'dagster/run_key'"
            )]  # fmt: skip
        assert any(k.startswith("minutes:") for k in keys)
        assert len(keys) == len(set(keys))
    finally:
        stop.set()
        dagster_stack.stop(daemon)
        writer.join(timeout=10)


def _client(settings):
    from energy_pipeline.influx import InfluxClient

    return InfluxClient(settings.influx_url, settings.influx_database)
