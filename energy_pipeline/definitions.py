"""The one Dagster `Definitions` of energy-pipeline: each domain's definitions, merged, plus the
resources they share. The environment is read here, once."""

from __future__ import annotations

from datetime import UTC, datetime

import dagster as dg

from energy_pipeline.config import Settings
from energy_pipeline.defs import hierarchy, minute_rollups, partition_window
from energy_pipeline.defs.alerts import build_defs as build_alert_defs
from energy_pipeline.defs.alerts import delivery_defs as alert_delivery
from energy_pipeline.defs.alerts.resources import AlertChannelsResource
from energy_pipeline.defs.minute_rollups.settings import MinuteRunSettings, MinuteSensorSettings
from energy_pipeline.defs.reports import build_defs as build_report_defs
from energy_pipeline.defs.retention import build_defs as build_retention_defs
from energy_pipeline.resources import InfluxDBResource, PostgresResource, from_settings


def _secret(settings: Settings, name: str, value: str) -> str:
    """`value`, or an `EnvVar` (resolved at run time, never shown in the UI) when `settings` took
    it from the environment variable `name`."""
    # Typed as str: Dagster resolves an EnvVar to its string before the resource sees it.
    return dg.EnvVar(name) if name in settings.env_secrets else value


def _optional_secret(settings: Settings, name: str) -> str | None:
    value = settings.secrets.get(name)
    return _secret(settings, name, value) if value else None


def build_resources(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    """The resources every domain shares, keyed as their assets and sensors ask for them."""
    return {
        "influxdb": InfluxDBResource(
            url=_secret(settings, "INFLUXDB_URL", settings.influx_url),
            database=settings.influx_database,
            retention_policy=settings.influx_retention_policy,
            measurement=settings.influx_measurement,
            read_parallelism=settings.read_parallelism,
            username=_optional_secret(settings, "INFLUXDB_USERNAME"),
            password=_optional_secret(settings, "INFLUXDB_PASSWORD"),
            token=_optional_secret(settings, "INFLUXDB_TOKEN"),
        ),
        "postgres": PostgresResource(dsn=_secret(settings, "ENERGY_PG_DSN", settings.pg_dsn)),
        "minute_sensors": from_settings(MinuteSensorSettings, settings),
        "minute_runs": from_settings(MinuteRunSettings, settings),
        "alert_channels": AlertChannelsResource(
            webhook_url=_secret(settings, "ALERT_WEBHOOK_URL", settings.alert_webhook_url) or None,
            webhook_secret=_optional_secret(settings, "ALERT_WEBHOOK_SECRET"),
            slack_webhook_url=_optional_secret(settings, "ALERT_SLACK_WEBHOOK_URL"),
            smtp_host=settings.alert_smtp_host or None,
            smtp_port=settings.alert_smtp_port,
            smtp_username=settings.alert_smtp_username or None,
            smtp_password=_optional_secret(settings, "ALERT_SMTP_PASSWORD"),
            smtp_from=settings.alert_smtp_from or None,
            smtp_to=list(settings.alert_smtp_to),
            smtp_starttls=settings.alert_smtp_starttls,
        ),
    }


def build_definitions(settings: Settings, now: datetime | None = None) -> dg.Definitions:
    """Every domain's assets, checks and sensors, with the shared resources."""
    # One reading of the clock: the minute asset and the checks on it must share one partition
    # set, also when loading straddles a UTC midnight.
    now = now or datetime.now(UTC)
    domains = [
        minute_rollups.build_defs(now, settings.raw_retention_days),
        hierarchy.build_defs(settings.lateness_seconds, settings.run_timeout_seconds),
        build_retention_defs(settings),
        alert_delivery.build_defs(),
        build_alert_defs(now, settings.raw_retention_days),
        build_report_defs(settings.reports_dir, settings.run_timeout_seconds),
    ]
    return dg.Definitions.merge(
        *domains,
        # Partition starts follow the clock at load: keeps the webserver loading them daily.
        partition_window.build_defs(domains, settings.webserver_url),
        dg.Definitions(
            resources=build_resources(settings),
            # Rollup runs are small: run their steps in the run's own process, not one per step.
            executor=dg.in_process_executor,
        ),
    )


defs = build_definitions(Settings.from_env())
