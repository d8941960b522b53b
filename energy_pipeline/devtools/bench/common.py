"""Options, targets and the shared dataset steps of `energy-pipeline bench`."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import polars as pl
import psycopg

from energy_pipeline.config import READ_PARALLELISM
from energy_pipeline.devtools.simulator import generate_points
from energy_pipeline.devtools.telemetry_writer import write_points
from energy_pipeline.influx import InfluxClient, quote_ident, to_ns
from energy_pipeline.sources import RawSource
from energy_pipeline.storage import copy_frame, upsert_devices

MEASUREMENT = "telemetry"
RAW_TABLE = "bench_raw_telemetry"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class BenchOptions:
    devices: int = 5_000
    minutes: int = 10
    long_minutes: int = 60  # 0 skips the long ranged run
    chunk_minutes: int = 5
    readers: int = 32
    read_seconds: float = 60.0
    scaling: tuple[int, ...] = (500, 1_000, 2_000, 5_000)
    seed: int = 42
    read_hours: int = 24  # the BI readers' window
    read_households: int = 20  # sampled households that get the whole window in both tables
    # While the readers run, the writer rewrites one minute of the whole fleet (and the coarse
    # windows it completes) every `writer_pace_s` seconds; 0 writes back to back.
    writer_pace_s: float = 0.0

    def __post_init__(self) -> None:
        if min(self.devices, self.minutes, self.chunk_minutes, self.readers,
               self.read_hours, self.read_households) < 1 or self.long_minutes < 0:  # fmt: skip
            raise ValueError(f"bench options must be positive (long_minutes may be 0): {self}")
        if self.writer_pace_s < 0:
            raise ValueError(f"writer_pace_s must not be negative, got {self.writer_pace_s}")
        if self.read_seconds < 1:
            raise ValueError(f"read_seconds must be at least 1, got {self.read_seconds}")
        if self.read_hours * 60 < max(self.minutes, self.long_minutes):
            raise ValueError("read_hours must cover the loaded history (minutes, long_minutes)")

    @classmethod
    def quick(cls) -> BenchOptions:
        return cls(devices=500, minutes=3, long_minutes=0, readers=4, read_seconds=3.0,
                   scaling=(100, 250, 500), read_hours=1, read_households=2)  # fmt: skip


@dataclass
class BenchTargets:
    """Where the bench writes: an InfluxDB database and a PostgreSQL database (both dedicated)."""

    influx_url: str
    influx_database: str
    pg_dsn: str
    influx_auth: dict[str, str] = field(default_factory=dict)
    # The local InfluxDB server's pid, to count the CPU it spends (None: not measured).
    influx_pid: int | None = None

    def influx(self, database: str | None = None) -> InfluxClient:
        return InfluxClient(
            self.influx_url,
            database or self.influx_database,
            username=self.influx_auth.get("INFLUXDB_USERNAME"),
            password=self.influx_auth.get("INFLUXDB_PASSWORD"),
            token=self.influx_auth.get("INFLUXDB_TOKEN"),
            timeout_s=600,
        )


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def copy_raw(conn: psycopg.Connection, points: pl.DataFrame) -> None:
    frame = points.with_columns(pl.from_epoch("time", "ns"))
    with conn.cursor() as cur:
        copy_frame(cur, RAW_TABLE, frame, schema=None)


def load_dataset(
    influx: InfluxClient,
    conn: psycopg.Connection | None,
    fleet: pl.DataFrame,
    start: datetime,
    minutes: int,
    seed: int,
    say: Progress,
) -> dict[str, float]:
    """Write `minutes` of points at 1 Hz to InfluxDB (and the raw PG table when `conn` is given)."""
    influx.create_database()
    t0 = time.perf_counter()
    total = 0
    with ThreadPoolExecutor(max_workers=2) as pool:
        for i in range(minutes):
            minute = start + timedelta(minutes=i)
            points = generate_points(fleet, to_ns(minute), 60, seed=seed)
            if conn is not None:
                copy_raw(conn, points)
            total += write_points(influx, points, MEASUREMENT, pool)
            if (i + 1) % 5 == 0 or i + 1 == minutes:
                say(f"  loaded {i + 1}/{minutes} minutes ({total:,} points, "
                    f"{total / (time.perf_counter() - t0):,.0f} points/s)")  # fmt: skip
    if conn is not None:
        conn.commit()
    seconds = time.perf_counter() - t0
    return {"points": total, "seconds": seconds, "points_per_s": total / seconds}


def reset_influx(influx: InfluxClient) -> None:
    """Drop and recreate the bench's (dedicated) InfluxDB database.

    Points of an earlier run at the same timestamps (the history ends on the hour, so runs within
    the same hour overlap) would otherwise stay, and a 500-device run would read 5,000 devices.
    """
    influx.query_json(f"DROP DATABASE {quote_ident(influx.database)}")
    influx.create_database()


def wait_for_quiet_influx(influx: InfluxClient, limit_s: float = 600) -> float:
    """Wait until InfluxDB has compacted a freshly loaded dataset; returns the seconds waited.

    Measuring while it compacts 18M new points (both cores busy) made its own GROUP BY six times
    slower than at rest, which would flatter the pipeline.
    """
    t = time.perf_counter()
    quiet = 0
    while time.perf_counter() - t < limit_s and quiet < 3:
        quiet = quiet + 1 if influx.compactions_pending() == 0 else 0
        time.sleep(2)
    return time.perf_counter() - t


def prepare_postgres(dsn: str, conn: psycopg.Connection, fleet: pl.DataFrame) -> None:
    from energy_pipeline.migrations import upgrade

    upgrade(dsn)
    upsert_devices(conn, fleet)
    with conn.transaction():
        conn.execute(f"DROP TABLE IF EXISTS {RAW_TABLE}")
        conn.execute(
            f"CREATE TABLE {RAW_TABLE} (time timestamptz NOT NULL, device_id text NOT NULL, "
            "household_id text NOT NULL, power_w float8, energy_wh float8, voltage_v float8)"
        )
        conn.execute(
            "TRUNCATE energy.device_rollup_1m, energy.quarantine, energy.rollup_minutes, "
            "energy.household_rollup_5m, energy.device_rollup_1h, energy.rollup_windows"
        )


def index_raw(conn: psycopg.Connection) -> None:
    # The "before" gets the indexes a team would give a raw table serving these queries.
    with conn.transaction():
        conn.execute(f"CREATE INDEX ON {RAW_TABLE} (time)")
        conn.execute(f"CREATE INDEX ON {RAW_TABLE} (device_id, time)")
        conn.execute(f"CREATE INDEX ON {RAW_TABLE} (household_id, time)")
    conn.execute(f"ANALYZE {RAW_TABLE}")
    conn.execute("ANALYZE energy.device_rollup_1m")


def raw_source(influx: InfluxClient) -> RawSource:
    """The bench measurement, read as the pipeline reads it."""
    return RawSource(influx, MEASUREMENT, READ_PARALLELISM)
