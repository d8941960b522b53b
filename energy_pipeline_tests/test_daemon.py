"""Daemon logging through outages: unreachable-server records are cut short and rate-limited, and
Dagster's own records are never printed twice."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest

from energy_pipeline.daemon import OutageThrottle

REFUSED = (
    '(psycopg2.OperationalError) connection to server at "127.0.0.1", port 5432 failed: '
    "Connection refused\n\tIs the server running on that host and accepting TCP/IP connections?"
)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _record(msg: str, *args: object, name: str = "dagster.daemon.SensorDaemon", level=40):
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_outage_records_are_one_line_and_once_per_window() -> None:
    clock = _Clock()
    throttle = OutageThrottle(window_s=60, clock=clock)
    trace = "Traceback (most recent call last):\n  File x\n" * 20 + REFUSED
    first = _record("Caught error:\n%s", trace)
    assert throttle.filter(first)
    message = first.getMessage()
    assert "\n" not in message
    assert message.startswith("Caught error: (psycopg2.OperationalError)")
    assert "Connection refused" in message
    for _ in range(30):
        clock.now += 1
        assert not throttle.filter(_record("Caught error:\n%s", trace))
    clock.now += 31
    again = _record("Caught error:\n%s", trace)
    assert throttle.filter(again)
    assert "30 similar records left out" in again.getMessage()


def test_other_records_pass_untouched() -> None:
    throttle = OutageThrottle(clock=_Clock())
    for _ in range(3):
        record = _record("Caught error:\n%s", "ValueError: a bug, not an outage\n  File y")
        assert throttle.filter(record)
        assert "\n" in record.getMessage()
    info = _record("Checking for new runs: %s", REFUSED, level=logging.INFO)
    assert throttle.filter(info) and throttle.filter(info)


def test_each_logger_and_message_has_its_own_window() -> None:
    throttle = OutageThrottle(clock=_Clock())
    assert throttle.filter(_record("Caught error:\n%s", REFUSED))
    assert throttle.filter(_record("Caught error:\n%s", REFUSED, name="dagster.daemon.AssetDaemon"))
    assert throttle.filter(_record("Failed to add heartbeat: \n%s", REFUSED))
    assert not throttle.filter(_record("Caught error:\n%s", REFUSED))


def test_daemon_process_logs_outage_once_and_never_duplicates_dagster_lines() -> None:
    """What dagster-postgres and the daemon do during an outage, in a real child process."""
    code = textwrap.dedent(
        f"""
        import logging, sys
        from energy_pipeline.daemon import install
        install()
        dagster = logging.getLogger("dagster")  # what Dagster's configure_loggers sets up
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("DAGSTER %(name)s %(message)s"))
        dagster.addHandler(handler)
        dagster.setLevel(logging.INFO)
        sensor = logging.getLogger("dagster.daemon.SensorDaemon")
        for _ in range(50):
            logging.warning("Retrying failed database connection: %s", {REFUSED!r})
        for _ in range(10):
            try:
                raise ConnectionError({REFUSED!r})
            except ConnectionError:
                sensor.exception("SensorDaemon caught an error")
        sensor.info("Checking for new runs for sensor: minute_rollup_sensor")
        logging.getLogger("alembic").warning("an unrelated warning")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.splitlines()
    retrying = [line for line in out if "Retrying failed database connection" in line]
    assert len(retrying) == 1 and "Connection refused" in retrying[0]
    caught = [line for line in out if "SensorDaemon caught an error" in line]
    assert len(caught) == 1 and caught[0].startswith("DAGSTER ")
    assert [line for line in out if "Checking for new runs" in line] == [
        "DAGSTER dagster.daemon.SensorDaemon Checking for new runs for sensor: minute_rollup_sensor"
    ]
    assert sum("an unrelated warning" in line for line in out) == 1
    assert not any(line.startswith(("INFO:", "WARNING:root", "ERROR:")) for line in out)
    assert len(out) == 4


def test_sensor_loop_setting_is_validated_and_reaches_dagsters_sensor_daemon():
    from dagster._daemon import sensor

    from energy_pipeline.daemon import sensor_loop_seconds, set_sensor_loop

    assert sensor_loop_seconds({}) == 1.0
    assert sensor_loop_seconds({"ENERGY_SENSOR_LOOP_SECONDS": "0.5"}) == 0.5
    for bad in ("0", "6", "fast"):
        with pytest.raises(SystemExit, match="ENERGY_SENSOR_LOOP_SECONDS must be between"):
            sensor_loop_seconds({"ENERGY_SENSOR_LOOP_SECONDS": bad})
    before = sensor.MIN_INTERVAL_LOOP_TIME
    try:
        set_sensor_loop(1.0)
        assert sensor.MIN_INTERVAL_LOOP_TIME == 1.0
    finally:
        sensor.MIN_INTERVAL_LOOP_TIME = before
