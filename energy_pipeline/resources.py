"""Dagster resources for the systems the pipeline talks to (InfluxDB and PostgreSQL), and how any
resource is configured from `Settings`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import dagster as dg
import psycopg

from energy_pipeline.config import READ_PARALLELISM, Settings, env_setting
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
    # Fields outside the contract the minute read skips (`ENERGY_UNREAD_FIELDS`).
    unread_fields: list[str] = []
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
        return RawSource(
            self.client(), self.measurement, self.read_parallelism, tuple(self.unread_fields)
        )


class PostgresResource(dg.ConfigurableResource):
    """PostgreSQL database holding the `energy` schema."""

    dsn: str

    def connect(self) -> psycopg.Connection:
        return connect(self.dsn)


SettingsResource = TypeVar("SettingsResource", bound=dg.ConfigurableResource)


def settings_fields(resource: type[dg.ConfigurableResource], prefix: str = "") -> dict[str, str]:
    """Which `Settings` field fills each field of `resource`: `prefix + name`, else `name`. A
    resource field with neither is left out (it keeps its default)."""
    names = {f.name for f in dataclasses.fields(Settings)} - {"env_secrets"}
    found = {}
    for name in resource.model_fields:
        for candidate in (prefix + name, name):
            if candidate in names:
                found[name] = candidate
                break
    return found


def _resource_value(settings: Settings, name: str, optional: bool) -> Any:
    value = getattr(settings, name)
    spec = env_setting(name)
    if spec is not None and spec.variable in settings.env_secrets:
        # Typed as the value: Dagster resolves the EnvVar to its text when a run starts.
        return dg.EnvVar(spec.variable)
    if optional and value == "":
        return None
    if isinstance(value, Path):  # Dagster config has no paths
        return str(value)
    return list(value) if isinstance(value, tuple) else value


def from_settings(
    resource: type[SettingsResource], settings: Settings, prefix: str = ""
) -> SettingsResource:
    """`resource` configured from `settings`: each field from the setting `settings_fields` names,
    as an `EnvVar` when the setting is a secret taken from the environment, None for an unset
    setting of an optional field, a list for a tuple. A setting a resource needs is declared once,
    in `Settings`, and never copied by hand."""
    return resource(
        **{
            name: _resource_value(settings, setting, resource.model_fields[name].default is None)
            for name, setting in settings_fields(resource, prefix).items()
        }
    )
