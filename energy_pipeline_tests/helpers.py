"""Shared test helpers: write points, run the asset, read rows back, and an independent roll-up."""

from __future__ import annotations

import contextlib
import math
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import dagster as dg
import psycopg
from psycopg import sql

from energy_pipeline.config import Settings
from energy_pipeline.definitions import build_definitions
from energy_pipeline.devtools.services import LocalPostgres
from energy_pipeline.scheduling import floor_minute, partition_key

ROLLUP_COLS = (
    "device_id, bucket, household_id, sample_count, power_w_avg, power_w_min, power_w_max, "
    "energy_wh_sum, rejected_count"
)


def base_minute(minutes_ago: int = 20) -> datetime:
    """A closed minute comfortably inside the partition range."""
    return floor_minute(datetime.now(UTC)) - timedelta(minutes=minutes_ago)


def range_tags(first: datetime, last: datetime) -> dict[str, str]:
    return {
        "dagster/asset_partition_range_start": partition_key(first),
        "dagster/asset_partition_range_end": partition_key(last),
    }


def materialize_minutes(
    settings: Settings,
    first: datetime,
    last: datetime,
    instance: dg.DagsterInstance | None = None,
    raise_on_error: bool = True,
) -> dg.ExecuteInProcessResult:
    """Run device_rollup_1m for the minutes first..last (inclusive) in one run."""
    defs = build_definitions(settings)
    kwargs = (
        {"partition_key": partition_key(first)}
        if first == last
        else {"tags": range_tags(first, last)}
    )
    return dg.materialize(
        [defs.get_assets_def("device_rollup_1m")],
        resources=defs.resources,
        instance=instance,
        raise_on_error=raise_on_error,
        **kwargs,
    )


def fetch_rollups(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            f"SELECT {ROLLUP_COLS} FROM energy.device_rollup_1m ORDER BY device_id, bucket"
        ).fetchall()


def fetch_quarantine(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT bucket, point_time_ns, device_id, household_id, power_w, energy_wh, "
            "voltage_v, reason FROM energy.quarantine "
            "ORDER BY bucket, device_id, point_time_ns, reason"
        ).fetchall()


def _valid(p: dict, known: set[str]) -> bool:
    power, energy, voltage = p.get("power_w"), p.get("energy_wh"), p.get("voltage_v")
    return (
        p["device_id"] in known
        and power is not None
        and 0 <= power <= 50_000
        and energy is not None
        and 0 <= energy <= 5_000
        and (voltage is None or 0 <= voltage <= 500)
    )


def independent_rollup(written: list[dict], known: dict[str, str]) -> dict[tuple, dict]:
    """Expected minute rollups computed in plain Python from the points as they were written.

    InfluxDB keeps one point per (series, timestamp), merging the fields of repeated writes; of
    points sharing device and timestamp across series, the pipeline keeps the smallest household.
    """
    stored: dict[tuple, dict] = {}
    for p in written:
        key = (p["device_id"], p["household_id"], p["time"])
        merged = stored.setdefault(key, {})
        merged.update({k: v for k, v in p.items() if v is not None})
    by_device_time: dict[tuple, dict] = {}
    for (device, _household, t), p in sorted(stored.items()):
        by_device_time.setdefault((device, t), p)
    groups: dict[tuple, dict] = defaultdict(
        lambda: {"powers": [], "energy": 0.0, "rejected": 0, "household": None}
    )
    for (device, t), p in sorted(by_device_time.items()):
        bucket = datetime.fromtimestamp(t // 10**9 // 60 * 60, UTC)
        if _valid(p, set(known)):
            g = groups[(device, bucket)]
            g["powers"].append(p["power_w"])
            g["energy"] += p["energy_wh"]
            g["household"] = g["household"] or p["household_id"]
        elif device in known:
            g = groups[(device, bucket)]
            g["rejected"] += 1
            g["rejected_household"] = p["household_id"]
    out = {}
    for (device, bucket), g in groups.items():
        powers = g["powers"]
        out[(device, bucket)] = {
            "household_id": g["household"] or g.get("rejected_household") or known[device],
            "sample_count": len(powers),
            "power_w_avg": sum(powers) / len(powers) if powers else None,
            "power_w_min": min(powers) if powers else None,
            "power_w_max": max(powers) if powers else None,
            "energy_wh_sum": g["energy"],
            "rejected_count": g["rejected"],
        }
    return out


def close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


@contextlib.contextmanager
def database_from(server: LocalPostgres, template: str) -> Iterator[str]:
    """A new database copied from `template`; its DSN, and it is dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        )
    try:
        yield server.dsn(name)
    finally:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


# What README ("Roles") tells a DBA to run for a BI login: role settings are not inherited.
BI_LOGIN_SQL = (
    "CREATE ROLE {user} LOGIN IN ROLE bi_reader",
    "ALTER ROLE {user} SET default_transaction_read_only = on",
    "ALTER ROLE {user} SET statement_timeout = '30s'",
)


def member_of(group: str) -> tuple[str, ...]:
    """The statements (for the `logins` fixture) of a plain login in `group`."""
    return (f"CREATE ROLE {{user}} LOGIN IN ROLE {group}",)


def as_user(dsn: str, user: str) -> str:
    """`dsn` (the test cluster's superuser) logging in as `user` instead."""
    return dsn.replace("postgres@", f"{user}@", 1)
