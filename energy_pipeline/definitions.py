"""The single Dagster `Definitions` of energy-pipeline; the environment is read here, once."""

from __future__ import annotations

import os
from datetime import UTC, datetime

import dagster as dg

from energy_pipeline.assets import build_device_rollup_1m, build_minute_partitions
from energy_pipeline.config import Settings
from energy_pipeline.resources import InfluxDBResource, PostgresResource, RollupSettings
from energy_pipeline.sensors import build_late_data_sensor, build_minute_rollup_sensor


def _secret(name: str, value: str | None) -> str | dg.EnvVar | None:
    """A secret from `settings`, as an `EnvVar` (resolved at run time, never shown in the UI)
    when that is where it came from; settings built otherwise (tests) are used as they are."""
    if value and os.environ.get(name) == value:
        return dg.EnvVar(name)
    return value


def build_definitions(settings: Settings, now: datetime | None = None) -> dg.Definitions:
    """Assets, sensors and resources for the given settings (secrets from the environment)."""
    partitions = build_minute_partitions(now or datetime.now(UTC), settings.raw_retention_days)
    device_rollup_1m = build_device_rollup_1m(partitions)
    return dg.Definitions(
        assets=[device_rollup_1m],
        sensors=[
            build_minute_rollup_sensor(device_rollup_1m, partitions),
            build_late_data_sensor(device_rollup_1m, partitions),
        ],
        resources={
            "influxdb": InfluxDBResource(
                # A URL with userinfo carries a password: keep it an EnvVar too.
                url=(_secret("INFLUXDB_URL", settings.influx_url) or settings.influx_url)
                if "@" in settings.influx_url
                else settings.influx_url,
                database=settings.influx_database,
                retention_policy=settings.influx_retention_policy,
                measurement=settings.influx_measurement,
                username=_secret("INFLUXDB_USERNAME", settings.secrets.get("INFLUXDB_USERNAME")),
                password=_secret("INFLUXDB_PASSWORD", settings.secrets.get("INFLUXDB_PASSWORD")),
                token=_secret("INFLUXDB_TOKEN", settings.secrets.get("INFLUXDB_TOKEN")),
            ),
            # The DSN can carry a password: keep it an EnvVar when it comes from the environment.
            "postgres": PostgresResource(
                dsn=_secret("ENERGY_PG_DSN", settings.pg_dsn) or settings.pg_dsn
            ),
            "rollup_settings": RollupSettings(
                settle_seconds=settings.settle_seconds,
                lateness_seconds=settings.lateness_seconds,
                late_audit_extra_seconds=settings.late_audit_extra_seconds,
                late_recent_seconds=settings.late_recent_seconds,
                late_full_scan_seconds=settings.late_full_scan_seconds,
                max_range_minutes=settings.max_range_minutes,
                chunk_minutes=settings.chunk_minutes,
                read_parallelism=settings.read_parallelism,
                raw_retention_days=settings.raw_retention_days,
                run_timeout_seconds=settings.run_timeout_seconds,
            ),
        },
        # Minute runs are small: run their steps in the run's own process, not one per step.
        executor=dg.in_process_executor,
    )


defs = build_definitions(Settings.from_env())
