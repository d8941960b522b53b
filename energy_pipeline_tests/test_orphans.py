"""A crash of the daemon's whole process tree mid-run: the run it leaves STARTED is failed by run
monitoring, stops blocking its minute, and rollups resume after a restart."""

from __future__ import annotations

import shutil
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from energy_pipeline.config import PROJECT_ROOT
from energy_pipeline.devtools import dagster_stack
from energy_pipeline.devtools.telemetry_writer import SimulationOptions, run_live
from energy_pipeline.influx import InfluxClient
from energy_pipeline.scheduling import minutes_between, parse_partition_key
from energy_pipeline.storage import MINUTE_WRITE_LOCK

pytestmark = pytest.mark.e2e
RUN_TIMEOUT_SECONDS = 20


def _dagster_home(tmp_path: Path) -> Path:
    """DAGSTER_HOME with the project's dagster.yaml, run monitoring polling every 2 s."""
    assert "max_runtime_seconds:" in (PROJECT_ROOT / "dagster.yaml").read_text()
    return dagster_stack.dagster_home(
        tmp_path / "dagster_home", {"poll_interval_seconds: 30": "poll_interval_seconds: 2"}
    )


def _wait(what: str, check: Callable[[], object], timeout_s: float, logs: list[Path]):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.25)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
    pytest.fail(f"timed out waiting for {what}\n{tails}")


def _runs(dagster_dsn: str) -> dict[str, tuple[str, dict[str, str]]]:
    """run_id -> (status, tags) of every run."""
    with psycopg.connect(dagster_dsn) as conn:
        if conn.execute("SELECT to_regclass('run_tags')").fetchone()[0] is None:
            return {}  # the daemon has not created Dagster's tables yet
        status = dict(conn.execute("SELECT run_id, status FROM runs").fetchall())
        tags: dict[str, dict[str, str]] = {}
        for run_id, key, value in conn.execute("SELECT run_id, key, value FROM run_tags"):
            tags.setdefault(run_id, {})[key] = value
    return {run_id: (s, tags.get(run_id, {})) for run_id, s in status.items()}


def _minutes(tags: dict[str, str]) -> list[datetime]:
    first = tags.get("dagster/asset_partition_range_start") or tags["dagster/partition"]
    last = tags.get("dagster/asset_partition_range_end") or tags["dagster/partition"]
    return minutes_between(parse_partition_key(first), parse_partition_key(last))


def _ledger(dsn: str) -> set[datetime]:
    with psycopg.connect(dsn) as conn:
        return {r[0] for r in conn.execute("SELECT bucket FROM energy.rollup_minutes")}


def _waiting_for_write_lock(dsn: str) -> bool:
    with psycopg.connect(dsn) as conn:
        return bool(
            conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            ).fetchone()[0]
        )


def test_killed_daemon_tree_leaves_no_stuck_minute(settings, dagster_db, tmp_path: Path):
    dagster_dsn = dagster_db
    env = dagster_stack.dagster_env(
        _dagster_home(tmp_path),
        dagster_db,
        {
            "INFLUXDB_URL": settings.influx_url,
            "INFLUXDB_DATABASE": settings.influx_database,
            "ENERGY_PG_DSN": settings.pg_dsn,
            "ENERGY_SETTLE_SECONDS": "1",
            "ENERGY_RUN_TIMEOUT_SECONDS": str(RUN_TIMEOUT_SECONDS),
        },
    )
    logs = [tmp_path / "daemon-1.log", tmp_path / "daemon-2.log"]
    stop = threading.Event()
    writer = threading.Thread(
        target=lambda: run_live(
            InfluxClient(settings.influx_url, settings.influx_database),
            settings,
            SimulationOptions(devices=3),
            300,
            stop,
        ),
        daemon=True,
    )
    writer.start()
    # Hold the write lock every run takes, so the first run stays mid-run until the crash.
    lock = psycopg.connect(settings.pg_dsn, autocommit=True)
    lock.execute("SELECT pg_advisory_lock(hashtext(%s))", (MINUTE_WRITE_LOCK,))
    daemons = [dagster_stack.start_daemon(env, logs[0])]
    try:

        def blocked_run():
            started = [
                (run_id, tags)
                for run_id, (status, tags) in _runs(dagster_dsn).items()
                if status == "STARTED" and tags.get("energy/origin") == "minutes"
            ]
            return started[0] if started and _waiting_for_write_lock(settings.pg_dsn) else None

        run_id, tags = _wait("a run blocked mid-write", blocked_run, 120, logs)
        lost = _minutes(tags)
        # A crash of the whole tree: daemon, code server and the run worker at once.
        dagster_stack.stop(daemons[0], signal.SIGKILL, whole_session=True)
        killed_at = datetime.now(UTC)
        lock.close()
        assert _runs(dagster_dsn)[run_id][0] == "STARTED"  # orphaned: nobody will finish it
        assert not set(lost) & _ledger(settings.pg_dsn)

        daemons.append(dagster_stack.start_daemon(env, logs[1]))
        _wait(
            "run monitoring to fail the orphan",
            lambda: _runs(dagster_dsn)[run_id][0] == "FAILURE",
            120,
            logs,
        )
        _wait(
            "the orphan's minutes to be repaired",
            lambda: set(lost) <= _ledger(settings.pg_dsn),
            120,
            logs,
        )
        _wait(
            "a minute after the restart to be rolled up",
            lambda: any(m > killed_at for m in _ledger(settings.pg_dsn)),
            120,
            logs,
        )
        repairs = [
            tags
            for status, tags in _runs(dagster_dsn).values()
            if tags.get("energy/origin") == "repair" and status == "SUCCESS"
        ]
        assert any(set(lost) <= set(_minutes(t)) for t in repairs)
        assert all(t.get("dagster/max_runtime") == str(RUN_TIMEOUT_SECONDS) for t in repairs)
    finally:
        stop.set()
        if not lock.closed:
            lock.close()
        for daemon in daemons:
            if daemon.poll() is None:
                dagster_stack.stop(daemon, signal.SIGINT, whole_session=True)
        writer.join(timeout=10)
        shutil.rmtree(tmp_path / "dagster_home", ignore_errors=True)
