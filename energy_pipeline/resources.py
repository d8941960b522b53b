"""Dagster resources for the systems the pipeline talks to: InfluxDB and PostgreSQL."""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import dagster as dg
import psycopg

from energy_pipeline.config import READ_PARALLELISM, Settings
from energy_pipeline.influx import InfluxClient
from energy_pipeline.sources import RawSource
from energy_pipeline.storage import connect


class InfluxDBResource(dg.ConfigurableResource):
    """InfluxDB holding the raw telemetry, read over its v1 HTTP API."""

    url: str
    database: str
    retention_policy: str = ""
    measurement: str = "telemetry"
    # Concurrent queries per read, each over a disjoint slice of the series (influx.py).
    read_parallelism: int = READ_PARALLELISM
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

    def source(self) -> RawSource:
        """The raw telemetry: the measurement, read `read_parallelism` slices at a time."""
        return RawSource(self.client(), self.measurement, self.read_parallelism)


class PostgresResource(dg.ConfigurableResource):
    """PostgreSQL database holding the `energy` schema."""

    dsn: str

    def connect(self) -> psycopg.Connection:
        return connect(self.dsn)


SettingsResource = TypeVar("SettingsResource", bound=dg.ConfigurableResource)


def from_settings(resource: type[SettingsResource], settings: Settings) -> SettingsResource:
    """`resource` configured from the `Settings` fields of the same names; its other fields keep
    their defaults. A setting a resource needs is a field of both, never copied by hand."""
    shared = set(resource.model_fields) & {f.name for f in dataclasses.fields(settings)}
    return resource(**{name: getattr(settings, name) for name in shared})
