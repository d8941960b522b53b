"""Table contracts in one place: raw points, the minute rollup, quarantine and ledger columns.

Column lists say what each PostgreSQL table receives; pandera (polars backend) contracts say what
valid rows are. Validate collected DataFrames: on a LazyFrame pandera checks the schema only and
skips data checks.
"""

from __future__ import annotations

import pandera.polars as pa
import polars as pl

# Fields and tags of a raw point in InfluxDB (input contract).
FIELDS = ("power_w", "energy_wh", "voltage_v")
TAGS = ("device_id", "household_id")
# Prefix of a raw read's column `extra:<field>:<type>` for a field outside the contract (read only
# to see which points carry nothing else).
EXTRA_FIELD_PREFIX = "extra:"


def extra_column(field: str, kind: str) -> str:
    """A raw read's column for values of type `kind` of `field`, a field outside the contract."""
    return f"{EXTRA_FIELD_PREFIX}{field}:{kind}"


def extra_field(column: str) -> str:
    """The field an `extra_column` holds."""
    return column.removeprefix(EXTRA_FIELD_PREFIX).rpartition(":")[0]


def contract_columns(columns: list[str]) -> list[str]:
    """Columns of a raw read holding the contract's fields: `power_w`, and typed ones such as
    `power_w__string` (see sources.py)."""
    return [c for c in columns if c.split("__")[0] in FIELDS]


BUCKET_DTYPE = pl.Datetime("us", "UTC")

# energy.quarantine: one rejected raw point and its reason.
QUARANTINE_SCHEMA: dict[str, pl.DataType] = {
    "bucket": BUCKET_DTYPE,
    "point_time_ns": pl.Int64(),
    "device_id": pl.String(),
    "household_id": pl.String(),
    "power_w": pl.Float64(),
    "energy_wh": pl.Float64(),
    "voltage_v": pl.Float64(),
    "reason": pl.String(),
}
# energy.device_rollup_1m, without computed_at (stamped at write time).
ROLLUP_COLUMNS = (
    "device_id",
    "bucket",
    "household_id",
    "sample_count",
    "power_w_avg",
    "power_w_min",
    "power_w_max",
    "energy_wh_sum",
    "rejected_count",
    "voltage_v_avg",
    "voltage_v_min",
    "voltage_v_max",
)
# A minute's checksum: count and sum of each field (see sources.py).
CHECKSUM_COLUMNS = tuple(f"{f}_{k}" for f in FIELDS for k in ("points", "sum"))
CHECKSUM_SCHEMA: dict[str, pl.DataType] = {
    "bucket": BUCKET_DTYPE,
    **{c: pl.Int64() if c.endswith("_points") else pl.Float64() for c in CHECKSUM_COLUMNS},
}
# energy.rollup_minutes (the ledger): counts of what the run saw, then the minute's checksum.
LEDGER_COLUMNS = (
    "bucket",
    "points_read",
    "duplicates_dropped",
    "rejected",
    "devices",
    *CHECKSUM_COLUMNS,
)

# A household device drawing more than this is a sensor fault, not a load (an EV charger is ~11 kW).
MAX_POWER_W = 50_000.0
# Energy since the previous point; at 1 Hz a 50 kW load adds ~14 Wh, so allow gaps of some minutes.
MAX_ENERGY_WH = 5_000.0
MAX_VOLTAGE_V = 500.0
MAX_TAG_LENGTH = 256


def _known(devices: pl.Series):
    wanted = devices.implode()

    def known_device(data: pa.PolarsData) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col(data.key).is_in(wanted))

    return pa.Check(known_device, name="known_device")


def raw_point_schema(known_devices: pl.Series | None = None) -> pa.DataFrameSchema:
    """Contract for one raw point; `known_devices` adds the registered-device check."""
    device_checks = [pa.Check.str_length(1, MAX_TAG_LENGTH)]
    if known_devices is not None:
        device_checks.append(_known(known_devices))
    return pa.DataFrameSchema(
        {
            "time": pa.Column(pl.Int64, nullable=False),
            "device_id": pa.Column(pl.String, nullable=False, checks=device_checks),
            "household_id": pa.Column(
                pl.String, nullable=False, checks=[pa.Check.str_length(1, MAX_TAG_LENGTH)]
            ),
            "power_w": pa.Column(
                pl.Float64, nullable=False, checks=[pa.Check.in_range(0.0, MAX_POWER_W)]
            ),
            "energy_wh": pa.Column(
                pl.Float64, nullable=False, checks=[pa.Check.in_range(0.0, MAX_ENERGY_WH)]
            ),
            "voltage_v": pa.Column(
                pl.Float64, nullable=True, checks=[pa.Check.in_range(0.0, MAX_VOLTAGE_V)]
            ),
        },
        strict=False,
        name="raw_point",
    )


def _avg_within_min_max(data: pa.PolarsData) -> pl.LazyFrame:
    # Float rounding can put a mean a hair outside [min, max]; allow a relative epsilon.
    eps = 1e-9 * (pl.col("power_w_max").abs() + 1.0)
    return data.lazyframe.select(
        pl.col("sample_count").eq(0)
        | (
            (pl.col("power_w_min") <= pl.col("power_w_avg") + eps)
            & (pl.col("power_w_avg") <= pl.col("power_w_max") + eps)
        )
    )


def _stats_present_iff_samples(data: pa.PolarsData) -> pl.LazyFrame:
    stats = ("power_w_avg", "power_w_min", "power_w_max")
    has_stats = pl.all_horizontal(pl.col(c).is_not_null() for c in stats)
    no_stats = pl.all_horizontal(pl.col(c).is_null() for c in stats)
    return data.lazyframe.select(
        pl.when(pl.col("sample_count") > 0).then(has_stats).otherwise(no_stats)
    )


DEVICE_ROLLUP_1M = pa.DataFrameSchema(
    {
        "device_id": pa.Column(pl.String, nullable=False),
        "bucket": pa.Column(pl.Datetime("us", "UTC"), nullable=False),
        "household_id": pa.Column(pl.String, nullable=False),
        # No upper bound: a device may send any number of points a minute (nanosecond spacing).
        "sample_count": pa.Column(pl.UInt32, nullable=False),
        "power_w_avg": pa.Column(pl.Float64, nullable=True, checks=pa.Check.ge(0.0)),
        "power_w_min": pa.Column(pl.Float64, nullable=True, checks=pa.Check.ge(0.0)),
        "power_w_max": pa.Column(pl.Float64, nullable=True, checks=pa.Check.le(MAX_POWER_W)),
        "energy_wh_sum": pa.Column(pl.Float64, nullable=False, checks=pa.Check.ge(0.0)),
        "rejected_count": pa.Column(pl.UInt32, nullable=False),
        **{
            c: pa.Column(pl.Float64, nullable=True, checks=pa.Check.in_range(0.0, MAX_VOLTAGE_V))
            for c in ("voltage_v_avg", "voltage_v_min", "voltage_v_max")
        },
    },
    checks=[
        pa.Check(_avg_within_min_max, name="avg_within_min_max"),
        pa.Check(_stats_present_iff_samples, name="stats_present_iff_samples"),
    ],
    unique=["device_id", "bucket"],
    strict=False,
    name="device_rollup_1m",
)
