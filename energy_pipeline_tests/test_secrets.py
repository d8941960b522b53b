"""No password reaches an error, a log, the Dagster event log or printed output.

Every failure path that can see a DSN or URL is driven with a known password, and everything
that can be captured is searched for its distinctive core.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import traceback
import uuid
from dataclasses import replace
from pathlib import Path

import dagster as dg
import pytest
from dagster._utils.error import serializable_error_info_from_exc_info

from energy_pipeline.config import ConfigError, Settings, redact_dsn
from energy_pipeline.definitions import build_definitions
from energy_pipeline.devtools.services import LocalInflux, free_port
from energy_pipeline.influx import InfluxClient, InfluxError
from energy_pipeline.storage import StorageError, connect
from energy_pipeline_tests.helpers import base_minute, materialize_minutes

CORE = "pw9Kx"  # in every password below; no log line has any other reason to contain it
BARE_PERCENT = f"{CORE}%7Xq!#"  # a bare '%': psycopg's parse error used to quote it
ENCODED = f"{CORE}%25q"  # valid percent-encoding: parses, then the connection fails


def assert_clean(*texts: object) -> None:
    for text in texts:
        assert CORE not in str(text), str(text)


def full_text(exc: BaseException) -> str:
    """Message, repr and the whole traceback with every chained exception."""
    return "".join([str(exc), repr(exc), *traceback.format_exception(exc)])


def dead_dsns(pg_server) -> list[str]:
    port = free_port()
    return [
        f"postgresql://etl:{BARE_PERCENT}@127.0.0.1:{port}/energy",
        f"postgresql://etl:{ENCODED}@127.0.0.1:{port}/energy",
        f"postgresql://etl@127.0.0.1:{port}/energy?password={CORE}",
        f"host=127.0.0.1 port={port} dbname=energy user=etl password='{CORE} x'",
        f"host=127.0.0.1 port={port} password='{CORE}",  # unterminated quote
        # The server is up but the database is not: libpq's own message.
        pg_server.dsn("no_such_db").replace("postgres@", f"postgres:{ENCODED}@"),
    ]


@pytest.mark.parametrize("dsn", [BARE_PERCENT, "Zz9", "a@b/c"])
def test_redaction_masks_every_form(dsn):
    for text in (
        f"postgresql://u:{dsn}@h/db",
        f"postgresql://u@h/db?sslmode=require&password={dsn}",
        f"host=h password={dsn} user=u",
        f"host=h password='{dsn} y' user=u",
        f"http://u:{dsn}@influx:8086",
    ):
        assert "***" in redact_dsn(text)
        assert dsn not in redact_dsn(text).replace("***", "")


def test_connect_errors_never_quote_the_password(pg_server):
    for dsn in dead_dsns(pg_server):
        with pytest.raises(StorageError, match="cannot connect to PostgreSQL") as info:
            connect(dsn)
        assert info.value.__cause__ is None and info.value.__context__ is None
        assert_clean(full_text(info.value))


def test_settings_reject_malformed_dsns_without_echoing_them(pg_server):
    for env in (
        {"ENERGY_PG_DSN": f"postgresql://etl:{BARE_PERCENT}@db/energy"},
        {"ENERGY_PG_DSN": f"host=db password='{CORE}"},
        {"DAGSTER_PG_URL": f"postgresql+psycopg2://etl:{BARE_PERCENT}@db/dagster"},
        {"DAGSTER_PG_URL": f"postgresql://etl:{CORE}@db/dagster"},
        {"INFLUXDB_URL": f"influx://u:{CORE}@host"},
        {"INFLUXDB_URL": f"http://u:{CORE}@host:99999"},
    ):
        with pytest.raises(ConfigError) as info:
            Settings.from_env(env)
        assert_clean(full_text(info.value))
    settings = Settings.from_env(
        {"ENERGY_PG_DSN": f"postgresql://etl:{ENCODED}@db/energy",
         "INFLUXDB_URL": f"http://u:{CORE}@influx:8086",
         "DAGSTER_PG_URL": f"postgresql+psycopg2://d:{CORE}@db/dagster"}
    )  # fmt: skip
    assert_clean(repr(settings), str(settings))


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "energy_pipeline.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_migrate_prints_no_password_on_success_or_failure(pg_server, pg_dsn):
    # The test cluster trusts loopback logins, so a password in the DSN is accepted and unused:
    # the success paths still print the DSN.
    db = pg_dsn.rsplit("/", 1)[1]
    good = [
        pg_dsn + f"?password={CORE}",
        pg_dsn.replace("postgres@", f"postgres:{ENCODED}@"),
        f"host=127.0.0.1 port={pg_server.port} dbname={db} user=postgres password='{CORE} y'",
    ]
    for dsn in good:
        result = run_cli(["migrate"], {"ENERGY_PG_DSN": dsn})
        assert result.returncode == 0, result.stderr
        assert "newest revision" in result.stdout
        assert_clean(result.stdout, result.stderr)
    for dsn in dead_dsns(pg_server):
        result = run_cli(["migrate"], {"ENERGY_PG_DSN": dsn})
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("energy-pipeline: ")
        assert_clean(result.stdout, result.stderr)


SENSORS = ("minute_rollup_sensor", "late_data_sensor")


def tick_error(defs: dg.Definitions, instance: dg.DagsterInstance, name: str) -> str | None:
    """What the daemon records for a failed tick (the error with its chain), or None."""
    sensor = defs.get_sensor_def(name)
    cursor = None
    for _ in range(2):  # the first tick of a sensor may only set its cursor
        context = dg.build_sensor_context(
            instance=instance, resources=defs.resources, cursor=cursor
        )
        try:
            result = sensor(context)
        except Exception:  # noqa: BLE001 - the failure under test
            error = serializable_error_info_from_exc_info(sys.exc_info())
            return error.to_string() + dg.serialize_value(error)
        cursor = getattr(result, "cursor", None) or context.cursor
    return None


def event_log_text(instance: dg.DagsterInstance, run_id: str) -> str:
    return "\n".join(dg.serialize_value(record) for record in instance.all_logs(run_id))


def test_failed_materialization_and_sensor_tick_keep_the_password_out(
    settings, pg_server, monkeypatch, capfd
):
    minute = base_minute()
    for dsn in dead_dsns(pg_server)[:3]:
        # As in production: the DSN comes from the environment and reaches Dagster as an EnvVar.
        monkeypatch.setenv("ENERGY_PG_DSN", dsn)
        broken = replace(settings, pg_dsn=dsn)
        with dg.instance_for_test() as instance:
            result = materialize_minutes(
                broken, minute, minute, instance=instance, raise_on_error=False
            )
            assert not result.success
            assert_clean(event_log_text(instance, result.run_id))
            defs = build_definitions(broken)
            failures = [tick_error(defs, instance, name) for name in SENSORS]
            assert any(failures), "a sensor tick should fail without PostgreSQL"
            for error in filter(None, failures):
                assert "cannot connect to PostgreSQL" in error
                assert_clean(error)
    out, err = capfd.readouterr()
    assert_clean(out, err)


def test_influx_url_userinfo_is_basic_auth_and_never_shown():
    root = Path(tempfile.mkdtemp(prefix="energy-secrets-"))
    server = LocalInflux(root, free_port(), auth=True)
    server.start()
    try:
        password = f"{CORE}Secret1"  # create_admin takes letters and digits only
        server.create_admin("admin", password)
        url = f"http://admin:{password}@127.0.0.1:{server.port}"
        client = InfluxClient(url, f"t_{uuid.uuid4().hex[:8]}")
        assert_clean(repr(client), client.url)
        client.create_database()
        client.write_lines(
            [f"telemetry,device_id=d1,household_id=h1 power_w=1,energy_wh=1 {10**18}"]
        )
        # The CSV read path (http.client) used to ignore userinfo and get 401.
        assert client.query_frame('SELECT * FROM "telemetry"').height == 1
        wrong = InfluxClient(url.replace(password, CORE + "Wrong"), client.database, retries=0)
        with pytest.raises(InfluxError, match="refused the credentials") as info:
            wrong.query_frame('SELECT * FROM "telemetry"')
        assert_clean(full_text(info.value))
        dead = InfluxClient(
            f"http://admin:{password}@127.0.0.1:{free_port()}", "x", retries=0, timeout_s=2
        )
        with pytest.raises(InfluxError) as info:
            dead.ping()
        assert_clean(full_text(info.value), repr(dead))
        with pytest.raises(InfluxError) as info:
            InfluxClient(f"ftp://admin:{password}@host", "x")
        assert_clean(full_text(info.value))
    finally:
        server.stop()


@pytest.mark.e2e
@pytest.mark.parametrize("which", [0, 1])
def test_daemon_log_and_compute_logs_keep_the_password_out(settings, pg_server, tmp_path, which):
    """The Dagster daemon, loading the code with a DSN it cannot use, logs no password."""
    import time

    from energy_pipeline.devtools import dagster_stack

    dagster_db = f"dagster_{uuid.uuid4().hex[:8]}"
    pg_server.create_database(dagster_db)
    home = dagster_stack.dagster_home(tmp_path / "dagster_home")
    env = dagster_stack.dagster_env(
        home,
        pg_server.dsn(dagster_db),
        {
            "INFLUXDB_URL": settings.influx_url,
            "INFLUXDB_DATABASE": settings.influx_database,
            "ENERGY_PG_DSN": dead_dsns(pg_server)[which],
            "ENERGY_SETTLE_SECONDS": "1",
        },
    )
    log = tmp_path / "daemon.log"
    daemon = dagster_stack.start_daemon(env, log)
    try:
        time.sleep(40)  # code location loads, sensors tick (and fail) several times
    finally:
        dagster_stack.stop(daemon)
    text = log.read_text(errors="replace")
    files = [p for p in home.rglob("*") if p.is_file()]
    assert_clean(text, *(p.read_text(errors="replace") for p in files))
    import psycopg

    with psycopg.connect(pg_server.dsn(dagster_db)) as conn:
        rows = conn.execute("SELECT coalesce(string_agg(event, ''), '') FROM event_logs").fetchone()
        ticks = conn.execute(
            "SELECT coalesce(string_agg(tick_body, ''), '') FROM job_ticks"
        ).fetchone()
    assert_clean(rows, ticks)
    if which == 0:  # unparsable: the code location refuses to load, naming the variable
        assert "ENERGY_PG_DSN" in text
    else:  # parsable but unusable: the sensors tick and fail
        assert ticks and ticks[0], "the sensors should have ticked"
