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
    assert s.influx_password == "hunter2"
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


# Per resource, the `Settings` field each of its fields is filled from. A renamed setting or
# resource field changes this table, so it cannot silently stop reaching its resource.
FILLED_FROM_SETTINGS = {
    "influxdb": {
        "url": "influx_url",
        "database": "influx_database",
        "retention_policy": "influx_retention_policy",
        "measurement": "influx_measurement",
        "read_parallelism": "read_parallelism",
        "unread_fields": "unread_fields",
        "username": "influx_username",
        "password": "influx_password",
        "token": "influx_token",
    },
    "postgres": {"dsn": "pg_dsn"},
    "minute_sensors": {
        name: name
        for name in (
            "settle_seconds",
            "lateness_seconds",
            "late_audit_extra_seconds",
            "late_recent_seconds",
            "late_full_scan_seconds",
            "max_range_minutes",
            "raw_retention_days",
            "run_timeout_seconds",
        )
    },
    "minute_runs": {"chunk_minutes": "chunk_minutes"},
    "alert_channels": {
        "webhook_url": "alert_webhook_url",
        "webhook_secret": "alert_webhook_secret",
        "slack_webhook_url": "alert_slack_webhook_url",
        "smtp_host": "alert_smtp_host",
        "smtp_port": "alert_smtp_port",
        "smtp_username": "alert_smtp_username",
        "smtp_password": "alert_smtp_password",
        "smtp_from": "alert_smtp_from",
        "smtp_to": "alert_smtp_to",
        "smtp_starttls": "alert_smtp_starttls",
    },
}


def test_each_shared_resource_is_filled_from_the_settings_listed_here():
    from energy_pipeline.definitions import SHARED_RESOURCES, build_resources
    from energy_pipeline.resources import settings_fields

    assert set(SHARED_RESOURCES) == set(FILLED_FROM_SETTINGS)
    for key, (resource, prefix) in SHARED_RESOURCES.items():
        assert settings_fields(resource, prefix) == FILLED_FROM_SETTINGS[key], key
    # The fields left out keep their defaults (timeouts, which no setting names).
    built = build_resources(Settings.from_env({}))
    assert built["influxdb"].timeout_s == 120.0
    assert built["alert_channels"].http_timeout_s == (
        built["alert_channels"].model_fields["http_timeout_s"].default
    )


def test_domain_resources_are_filled_from_their_settings(tmp_path):
    from energy_pipeline.definitions import build_definitions

    env = {
        "ENERGY_REPORTS_DIR": str(tmp_path / "pages"),
        "DAGSTER_WEBSERVER_URL": "http://127.0.0.1:3999",
    }
    resources = build_definitions(Settings.from_env(env)).resources or {}
    assert resources["report_output"].reports_dir == str(tmp_path / "pages")
    assert resources["dagster_webserver"].url == "http://127.0.0.1:3999"
    # A field no setting names keeps its default.
    assert resources["dagster_webserver"].timeout_s == 10.0


CREDENTIALS_ENV = {
    "INFLUXDB_URL": "http://reader:url-pw-41@influx.example:8086",
    "INFLUXDB_TOKEN": "token-41",
    "INFLUXDB_USERNAME": "reader",
    "INFLUXDB_PASSWORD": "influx-pw-41",
    "ENERGY_PG_DSN": "postgresql://etl:pg-pw-41@db.example/energy",
    "ALERT_WEBHOOK_URL": "https://hooks.example.org/e?token=hook-token-41",
    "ALERT_WEBHOOK_SECRET": "whsec-41",
    "ALERT_SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T0/B0/slack-41",
    "ALERT_SMTP_PASSWORD": "smtp-pw-41",
}


def test_a_secret_from_the_environment_reaches_its_resource_as_an_env_var_not_its_value():
    import dagster as dg

    from energy_pipeline.definitions import build_resources

    resources = build_resources(Settings.from_env(CREDENTIALS_ENV))
    expected = {
        ("influxdb", "url"): "INFLUXDB_URL",
        ("influxdb", "token"): "INFLUXDB_TOKEN",
        ("influxdb", "username"): "INFLUXDB_USERNAME",
        ("influxdb", "password"): "INFLUXDB_PASSWORD",
        ("postgres", "dsn"): "ENERGY_PG_DSN",
        ("alert_channels", "webhook_url"): "ALERT_WEBHOOK_URL",
        ("alert_channels", "webhook_secret"): "ALERT_WEBHOOK_SECRET",
        ("alert_channels", "slack_webhook_url"): "ALERT_SLACK_WEBHOOK_URL",
        ("alert_channels", "smtp_password"): "ALERT_SMTP_PASSWORD",
    }
    for (key, name), variable in expected.items():
        value = getattr(resources[key], name)
        assert isinstance(value, dg.EnvVar) and value.env_var_name == variable, (key, name)
    shown = " ".join(repr(resource) for resource in resources.values())
    assert "-41" not in shown


def test_values_that_hold_no_secret_reach_their_resource_as_values():
    from energy_pipeline.definitions import build_resources

    env = {
        "INFLUXDB_URL": "http://influx.example:8086",
        "ALERT_WEBHOOK_URL": "https://hooks.example.org/energy",
        "ALERT_WEBHOOK_SECRET": "whsec-41",
        "ALERT_SMTP_HOST": "smtp.example.org",
        "ALERT_SMTP_FROM": "alerts@example.org",
        "ALERT_SMTP_TO": "a@example.org, b@example.org",
    }
    resources = build_resources(Settings.from_env(env))
    influx, alerts = resources["influxdb"], resources["alert_channels"]
    assert influx.url == "http://influx.example:8086"
    # Unset credentials are None, not an EnvVar of an empty variable.
    assert (influx.username, influx.password, influx.token) == (None, None, None)
    # The default DSN did not come from the environment: there is no variable to resolve.
    assert resources["postgres"].dsn == "postgresql://postgres@127.0.0.1:15432/energy"
    assert alerts.webhook_url == "https://hooks.example.org/energy"
    assert alerts.smtp_to == ["a@example.org", "b@example.org"]
    assert (alerts.slack_webhook_url, alerts.smtp_username) == (None, None)


def test_repr_masks_every_declared_secret_and_keeps_the_rest_readable():
    s = Settings.from_env(CREDENTIALS_ENV)
    shown = repr(s)
    assert "-41" not in shown
    assert "influx.example:8086" in shown and "hooks.example.org/e" in shown
    assert "influx_token='***'" in shown and "alert_smtp_password='***'" in shown
    assert "influx_username=''" not in shown  # set, and masked like the others
    assert "alert_smtp_username=''" in shown  # unset values stay visible as unset
