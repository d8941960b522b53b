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

# The resources every domain shares, keyed as their assets and sensors ask for them, each with the
# prefix of the `Settings` fields that configure it (`resources.from_settings`).
SHARED_RESOURCES: dict[str, tuple[type[dg.ConfigurableResource], str]] = {
    "influxdb": (InfluxDBResource, "influx_"),
    "postgres": (PostgresResource, "pg_"),
    "minute_sensors": (MinuteSensorSettings, ""),
    "minute_runs": (MinuteRunSettings, ""),
    "alert_channels": (AlertChannelsResource, "alert_"),
}


def build_resources(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    """The resources every domain shares, configured from `settings`."""
    return {
        key: from_settings(resource, settings, prefix)
        for key, (resource, prefix) in SHARED_RESOURCES.items()
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
        build_report_defs(settings),
    ]
    return dg.Definitions.merge(
        *domains,
        # Partition starts follow the clock at load: keeps the webserver loading them daily.
        partition_window.build_defs(domains, settings),
        dg.Definitions(
            resources=build_resources(settings),
            # Rollup runs are small: run their steps in the run's own process, not one per step.
            executor=dg.in_process_executor,
        ),
    )


defs = build_definitions(Settings.from_env())
