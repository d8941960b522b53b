"""Dagster resources wrapping InfluxDB and PostgreSQL, plus the pipeline's tunable settings."""

from __future__ import annotations

import dagster as dg
import psycopg

from energy_pipeline.influx import InfluxClient
from energy_pipeline.storage import connect


class InfluxDBResource(dg.ConfigurableResource):
    """InfluxDB holding the raw telemetry, read over its v1 HTTP API."""

    url: str
    database: str
    retention_policy: str = ""
    measurement: str = "telemetry"
    username: str | None = None
    password: str | None = None
    token: str | None = None
    timeout_s: float = 120.0

    def client(self) -> InfluxClient:
        return InfluxClient(
            self.url,
            self.database,
            retention_policy=self.retention_policy,
            username=self.username,
            password=self.password,
            token=self.token,
            timeout_s=self.timeout_s,
        )


class PostgresResource(dg.ConfigurableResource):
    """PostgreSQL database holding the `energy` schema."""

    dsn: str

    def connect(self) -> psycopg.Connection:
        return connect(self.dsn)


class RollupSettings(dg.ConfigurableResource):
    """How the minute roll-up and its sensors pace themselves (defaults: `config.Settings`)."""

    settle_seconds: int
    lateness_seconds: int
    late_audit_extra_seconds: int
    late_recent_seconds: int
    late_full_scan_seconds: int
    max_range_minutes: int
    chunk_minutes: int
    read_parallelism: int
    raw_retention_days: int
    run_timeout_seconds: int
