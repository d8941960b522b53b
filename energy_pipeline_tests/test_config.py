"""Settings from the environment and clear errors for bad configuration or dead servers."""

from __future__ import annotations

import os

import pytest

from energy_pipeline.config import ConfigError, Settings
from energy_pipeline.devtools.services import LocalInflux, LocalPostgres, ServiceError, free_port
from energy_pipeline.migrations import sqlalchemy_url
from energy_pipeline.storage import StorageError, connect, redact_dsn


def test_defaults_point_at_the_local_stack():
    s = Settings.from_env({})
    assert s.influx_url == "http://127.0.0.1:18086"
    assert s.pg_dsn == "postgresql://postgres@127.0.0.1:15432/energy"
    assert (s.raw_retention_days, s.settle_seconds, s.lateness_seconds) == (30, 3, 7200)


def test_environment_overrides_and_secrets_stay_out_of_repr():
    s = Settings.from_env({"INFLUXDB_URL": "http://127.0.0.1:9", "INFLUXDB_PASSWORD": "hunter2",
                           "ENERGY_LATENESS_SECONDS": "60"})  # fmt: skip
    assert s.influx_url == "http://127.0.0.1:9"
    assert s.lateness_seconds == 60
    assert s.secrets["INFLUXDB_PASSWORD"] == "hunter2"
    assert "hunter2" not in repr(s)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ENERGY_SETTLE_SECONDS": "soon"}, "must be an integer"),
        ({"ENERGY_CHUNK_MINUTES": "0"}, "must be >= 1"),
        ({"ENERGY_RAW_RETENTION_DAYS": "90"}, "100,000"),
        ({"ENERGY_READ_PARALLELISM": "11"}, "between 1 and 10"),
    ],
)
def test_bad_settings_are_clear_errors(env, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_unreachable_postgres_is_a_clear_error():
    with pytest.raises(StorageError, match="cannot connect to PostgreSQL"):
        connect(f"postgresql://postgres@127.0.0.1:{free_port()}/energy")


def test_taken_port_is_reported_before_starting(tmp_path, pg_server):
    with pytest.raises(ServiceError, match="already taken"):
        LocalPostgres(tmp_path / "pg", pg_server.port).start()


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://etl:s3cret@db:5432/energy", "postgresql://etl:***@db:5432/energy"),
        (
            "postgresql://postgres@127.0.0.1:15432/energy",
            "postgresql://postgres@127.0.0.1:15432/energy",
        ),
    ],
)
def test_passwords_are_redacted_before_printing(dsn, shown):
    assert redact_dsn(dsn) == shown


def test_stale_pid_file_never_signals_an_unrelated_process(tmp_path):
    server = LocalInflux(tmp_path, free_port())
    tmp_path.mkdir(exist_ok=True)
    server.pid_file.write_text(str(os.getpid()))  # this test process is not influxd
    server.stop(timeout_s=1)
    assert not server.pid_file.exists()
    os.kill(os.getpid(), 0)  # still alive


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"INFLUXDB_URL": "127.0.0.1:8086"}, "INFLUXDB_URL must look like http"),
        ({"INFLUXDB_URL": "http://"}, "INFLUXDB_URL must look like http"),
        ({"INFLUXDB_URL": "http://host:70000"}, "INFLUXDB_URL: port must be between 1 and 65535"),
        ({"ENERGY_PG_DSN": "postgresql://u:50%off@db/energy"}, "ENERGY_PG_DSN is not a valid"),
        ({"ENERGY_PG_DSN": "host=db port=0"}, "ENERGY_PG_DSN: port must be between"),
        ({"ENERGY_PG_DSN": "postgresql://db:99999/energy"}, "ENERGY_PG_DSN: port must be between"),
        ({"ENERGY_PG_PORT": "70000"}, "ENERGY_PG_PORT must be between 1 and 65535"),
        ({"DAGSTER_PG_URL": "postgresql://db/dagster"}, "must start with postgresql\\+psycopg2"),
    ],
)
def test_malformed_urls_and_dsns_fail_at_load_naming_the_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_key_value_dsns_load_and_migrate(pg_server):
    dsn = f"host=127.0.0.1 port={pg_server.port} user=postgres dbname=postgres"
    assert Settings.from_env({"ENERGY_PG_DSN": dsn}).pg_dsn == dsn
    url = sqlalchemy_url(f"{dsn} password='a b%c' sslmode=prefer")
    assert (url.host, url.port, url.database, url.password) == (
        "127.0.0.1", pg_server.port, "postgres", "a b%c"
    )  # fmt: skip
    assert url.query == {"sslmode": "prefer"}


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        (
            "postgresql://etl:s%25c@db/energy?password=x",
            "postgresql://etl:***@db/energy?password=***",
        ),
        ("host=db password='a b' user=etl", "host=db password=*** user=etl"),
        ("http://user:p@ss@influx:8086/", "http://user:***@influx:8086/"),
    ],
)
def test_every_form_of_password_is_redacted(dsn, shown):
    assert redact_dsn(dsn) == shown


def test_settings_resources_take_every_same_named_setting():
    import dagster as dg

    from energy_pipeline.defs.minute_rollups.settings import MinuteRunSettings, MinuteSensorSettings
    from energy_pipeline.defs.retention.assets import RetentionSettings
    from energy_pipeline.resources import from_settings

    s = Settings.from_env({"ENERGY_SETTLE_SECONDS": "7", "ENERGY_CHUNK_MINUTES": "9"})
    sensors = from_settings(MinuteSensorSettings, s)
    assert sensors.settle_seconds == 7
    assert all(getattr(sensors, n) == getattr(s, n) for n in MinuteSensorSettings.model_fields)
    assert from_settings(MinuteRunSettings, s).chunk_minutes == 9
    retention = from_settings(RetentionSettings, s)
    assert retention.retention_device_rollup_1m_days == s.retention_device_rollup_1m_days
    assert retention.lock_timeout_ms == RetentionSettings.model_fields["lock_timeout_ms"].default

    class Misspelt(dg.ConfigurableResource):
        settle_secs: int  # no setting of that name: construction fails instead of guessing

    with pytest.raises(Exception, match="settle_secs"):
        from_settings(Misspelt, s)
