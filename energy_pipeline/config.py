"""Settings read from environment variables, with defaults for the local stack.

Every variable is listed in the README. Read once, by `definitions.py` and the CLI; nothing here is
evaluated at import time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A setting is missing or malformed."""


def _int(
    env: Mapping[str, str], name: str, default: int, minimum: int = 0, maximum: int | None = None
) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from exc
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise ConfigError(f"{name} must be {bounds}, got {value}")
    return value


def dagster_storage_url(url: str) -> str:
    """Pin dagster-postgres to psycopg2: SQLAlchemy 2.1 maps plain `postgresql://` to psycopg 3,
    whose server-side parameters break dagster-postgres' `NOTIFY run_events, %s`."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix) :]
    return url


# Concurrent InfluxDB queries per read, each over a disjoint slice of the series (see influx.py).
READ_PARALLELISM = 2


@dataclass(frozen=True)
class Settings:
    """Everything the pipeline and the local stack need to know about their surroundings."""

    data_dir: Path
    influx_port: int
    pg_port: int
    influx_url: str
    influx_database: str
    influx_retention_policy: str
    influx_measurement: str
    pg_dsn: str
    dagster_pg_url: str
    raw_retention_days: int = 30
    settle_seconds: int = 5
    lateness_seconds: int = 7200
    late_audit_extra_seconds: int = 3600
    late_recent_seconds: int = 900
    late_full_scan_seconds: int = 900
    max_range_minutes: int = 60
    chunk_minutes: int = 5
    read_parallelism: int = READ_PARALLELISM
    secrets: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        data_dir = Path(env.get("ENERGY_DATA_DIR") or PROJECT_ROOT / ".data")
        influx_port = _int(env, "ENERGY_INFLUX_PORT", 18086, 1)
        pg_port = _int(env, "ENERGY_PG_PORT", 15432, 1)
        local_pg = f"postgresql://postgres@127.0.0.1:{pg_port}"
        settings = cls(
            data_dir=data_dir,
            influx_port=influx_port,
            pg_port=pg_port,
            influx_url=env.get("INFLUXDB_URL") or f"http://127.0.0.1:{influx_port}",
            influx_database=env.get("INFLUXDB_DATABASE") or "energy",
            influx_retention_policy=env.get("INFLUXDB_RETENTION_POLICY") or "",
            influx_measurement=env.get("INFLUXDB_MEASUREMENT") or "telemetry",
            pg_dsn=env.get("ENERGY_PG_DSN") or f"{local_pg}/energy",
            dagster_pg_url=dagster_storage_url(env.get("DAGSTER_PG_URL") or f"{local_pg}/dagster"),
            raw_retention_days=_int(env, "ENERGY_RAW_RETENTION_DAYS", 30, 1),
            settle_seconds=_int(env, "ENERGY_SETTLE_SECONDS", 5),
            lateness_seconds=_int(env, "ENERGY_LATENESS_SECONDS", 7200),
            late_audit_extra_seconds=_int(env, "ENERGY_LATE_AUDIT_EXTRA_SECONDS", 3600),
            late_recent_seconds=_int(env, "ENERGY_LATE_RECENT_SECONDS", 900, 60),
            late_full_scan_seconds=_int(env, "ENERGY_LATE_FULL_SCAN_SECONDS", 900),
            max_range_minutes=_int(env, "ENERGY_MAX_RANGE_MINUTES", 60, 1),
            chunk_minutes=_int(env, "ENERGY_CHUNK_MINUTES", 5, 1),
            read_parallelism=_int(env, "ENERGY_READ_PARALLELISM", READ_PARALLELISM, 1, 10),
            secrets={
                k: env[k]
                for k in ("INFLUXDB_TOKEN", "INFLUXDB_USERNAME", "INFLUXDB_PASSWORD")
                if env.get(k)
            },
        )
        if settings.raw_retention_days * 1440 > 95_000:
            raise ConfigError(
                "ENERGY_RAW_RETENTION_DAYS above 65 would exceed Dagster's advised 100,000 minute "
                "partitions per asset"
            )
        return settings
