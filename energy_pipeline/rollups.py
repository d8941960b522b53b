"""Raw points → validated per-device minute rollups, quarantine rows and a per-minute ledger.

Pure Polars + pandera; no I/O and no Dagster, so every rule here is tested directly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pandera.polars as pa
import polars as pl

from energy_pipeline.schemas import (
    BUCKET_DTYPE,
    CHECKSUM_COLUMNS,
    DEVICE_ROLLUP_1M,
    EXTRA_FIELD_PREFIX,
    FIELDS,
    LEDGER_COLUMNS,
    MAX_TAG_LENGTH,
    QUARANTINE_SCHEMA,
    ROLLUP_COLUMNS,
    TAGS,
    contract_columns,
    extra_field,
    raw_point_schema,
)

# Friendlier words for pandera's check names in quarantine reasons.
_REASON_WORDS = {"not_nullable": "missing", "known_device": "unknown device"}
# Of several reasons for one column, only the most specific is kept: a value stored as text is
# "not a number", not also "missing" and "out of range".
_SPECIFIC, _CONTRACT = 0, 1
# Longest raw value quoted in a reason.
_QUOTE_CHARS = 40


@dataclass
class MinuteBatch:
    """Everything one window of raw points turns into."""

    rollups: pl.DataFrame
    quarantine: pl.DataFrame
    ledger: pl.DataFrame
    points_read: int
    duplicates_dropped: int
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def rejected(self) -> int:
        return self.quarantine.height


def minute_buckets(start: datetime, end: datetime) -> pl.DataFrame:
    """One row per minute start in [start, end)."""
    if end <= start:
        return pl.DataFrame(schema={"bucket": BUCKET_DTYPE})
    return pl.DataFrame(
        {"bucket": pl.datetime_range(start, end - timedelta(minutes=1), "1m", eager=True)}
    ).with_columns(pl.col("bucket").cast(BUCKET_DTYPE))


def _bucket(col: str = "time") -> pl.Expr:
    return (
        pl.from_epoch(pl.col(col), "ns")
        .dt.truncate("1m")
        .dt.replace_time_zone("UTC")
        .cast(BUCKET_DTYPE)
    )


def _quoted(value: pl.Expr) -> pl.Expr:
    """A raw value for a reason: quoted, cut short, NUL shown as \\x00."""
    text = value.cast(pl.String).str.replace_all("\x00", "\\x00", literal=True)
    return pl.concat_str(pl.lit("'"), text.str.slice(0, _QUOTE_CHARS), pl.lit("'"))


def _failures(frame: pl.DataFrame, bad: pl.Expr, column: str, reason: pl.Expr) -> pl.DataFrame:
    return (
        frame.select(
            pl.int_range(pl.len(), dtype=pl.Int64).alias("index"),
            pl.lit(column).alias("column"),
            reason.alias("reason"),
            pl.lit(_SPECIFIC).alias("priority"),
            bad.fill_null(False).alias("bad"),
        )
        .filter("bad")
        .drop("bad")
    )


def parse_fields(raw: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Main fields as floats; return the parsed frame and (index, column, reason) failures.

    Besides the contract's checks, a point fails when a field holds text, a boolean or a
    non-finite number (in a typed column of its own, see sources.py, or as unparseable text), a
    field is named like a tag, or a tag holds NUL or invalid UTF-8 (read as U+FFFD). One bad value
    must not fail the whole column, so casting is lenient and every failure is reported instead.
    """
    parsed = raw.with_columns(
        pl.col(f).cast(pl.Float64, strict=False)
        if f in raw.columns
        else pl.lit(None, pl.Float64).alias(f)
        for f in FIELDS
    )
    failures = []
    for f in FIELDS:
        if f in raw.columns and raw.schema[f] == pl.String:
            unparsed = pl.col(f).is_not_null() & pl.col(f).cast(pl.Float64, strict=False).is_null()
            reason = pl.concat_str(pl.lit(f"{f}: not a number ("), _quoted(pl.col(f)), pl.lit(")"))
            failures.append(_failures(raw, unparsed, f, reason))
        failures.append(
            _failures(parsed, pl.col(f).is_infinite() | pl.col(f).is_nan(), f,
                      pl.lit(f"{f}: not a finite number"))
        )  # fmt: skip
        for kind in ("string", "boolean"):
            typed = f"{f}__{kind}"
            if typed in raw.columns:
                reason = pl.concat_str(
                    pl.lit(f"{f}: not a number ({kind} "), _quoted(pl.col(typed)), pl.lit(")")
                )
                failures.append(_failures(raw, pl.col(typed).is_not_null(), f, reason))
    extra = [c for c in raw.columns if c.startswith(EXTRA_FIELD_PREFIX)]
    if extra:
        # A point carrying none of the contract's fields (a misspelt `Power_W`, a sensor's own
        # field) would otherwise only be "missing" power: name what it carried instead.
        ours = contract_columns(raw.columns)
        carried = pl.concat_str(
            [pl.when(pl.col(c).is_not_null()).then(pl.lit(extra_field(c)))
             for c in extra],
            separator=", ", ignore_nulls=True,
        )  # fmt: skip
        failures.append(
            _failures(raw, pl.all_horizontal(pl.lit(True), *(pl.col(c).is_null() for c in ours))
                      & (carried != ""),
                      "fields", pl.concat_str(pl.lit("fields outside the contract: "), carried))
        )  # fmt: skip
    for tag in TAGS:
        as_field = [c for c in raw.columns if c.startswith(f"{tag}__")]
        if as_field:
            present = pl.any_horizontal(pl.col(c).is_not_null() for c in as_field)
            failures.append(_failures(raw, present, tag, pl.lit(f"{tag}: also written as a field")))
        if tag in raw.columns:
            value = pl.col(tag)
            failures += [
                _failures(raw, value.str.contains("\x00", literal=True), tag,
                          pl.lit(f"{tag}: contains NUL")),
                _failures(raw, value.str.contains("\ufffd", literal=True), tag,
                          pl.lit(f"{tag}: invalid UTF-8")),
            ]  # fmt: skip
    # NaN and infinities are failures already; as nulls they also keep the roll-up's sums finite.
    parsed = parsed.with_columns(
        pl.when(pl.col(f).is_finite()).then(pl.col(f)).otherwise(None).alias(f) for f in FIELDS
    )
    return parsed, pl.concat(failures)


def validation_failures(points: pl.DataFrame, known_devices: pl.Series | None) -> pl.DataFrame:
    """Run the raw-point contract; return one row per (index, column, reason) that failed."""
    try:
        raw_point_schema(known_devices).validate(points, lazy=True)
    except pa.errors.SchemaErrors as exc:
        cases = exc.failure_cases
    else:
        return pl.DataFrame(
            schema={
                "index": pl.Int64,
                "column": pl.String,
                "reason": pl.String,
                "priority": pl.Int32,
            }
        )
    if cases["index"].null_count():
        # A failure without a row (missing column, wrong dtype) breaks the contract: not bad data.
        raise ValueError(f"raw points do not match the contract: {cases.to_dicts()[:5]}")
    check = pl.col("check")
    word = check.replace_strict(_REASON_WORDS, default=check, return_dtype=pl.String)
    return cases.select(
        pl.col("index").cast(pl.Int64),
        pl.col("column"),
        pl.concat_str(pl.col("column"), pl.lit(": "), word).alias("reason"),
        pl.lit(_CONTRACT).alias("priority"),
    )


def point_reasons(parse_failures: pl.DataFrame, contract: pl.DataFrame) -> pl.DataFrame:
    """One reason text per failed point: per column only its most specific reasons."""
    failures = pl.concat([parse_failures, contract], how="vertical_relaxed")
    return (
        failures.filter(pl.col("priority") == pl.col("priority").min().over("index", "column"))
        .group_by("index")
        .agg(pl.col("reason").unique().sort().str.join("; "))
    )


def roll_up_minutes(
    raw: pl.DataFrame,
    start: datetime,
    end: datetime,
    devices: pl.DataFrame | None = None,
    checksums: pl.DataFrame | None = None,
) -> MinuteBatch:
    """Dedupe, validate and roll up the raw points of [start, end) per device and minute.

    Args:
        raw: points as read from InfluxDB (`time` in ns; fields as floats or text, plus the
            typed columns of sources.py when a field also holds other types).
        start, end: the minute-aligned UTC window the points were read for.
        devices: registered devices (`device_id`, `household_id`); points of other devices are
            quarantined as unknown. None skips that check.
        checksums: InfluxDB's per-minute checksums of the window, kept in the ledger; None
            computes them from `raw` (for points that never were in InfluxDB).
    """
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    points_read = raw.height
    duplicates, deduped, conflicting = _split_duplicates(raw)

    parsed, parse_failures = parse_fields(deduped)
    known = devices["device_id"] if devices is not None else None
    reasons = point_reasons(parse_failures, validation_failures(parsed, known))
    if reasons.is_empty():  # the usual case: no need to split the frame
        valid = parsed
        rejected = parsed.clear().with_columns(pl.lit(None, pl.String).alias("reason"))
    else:
        indexed = parsed.with_row_index("index").with_columns(pl.col("index").cast(pl.Int64))
        rejected = indexed.join(reasons, on="index", how="inner").drop("index")
        valid = indexed.join(reasons, on="index", how="anti").drop("index")
    seconds["validate"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    rollups = _roll_up(valid, rejected, devices)
    DEVICE_ROLLUP_1M.validate(rollups)
    if not conflicting.is_empty():
        # Duplicates that lost values are quarantined too (counted as duplicates, not rejected).
        lost = parse_fields(conflicting.drop("reason"))[0].with_columns(conflicting["reason"])
        rejected_or_lost = pl.concat([rejected, lost], how="diagonal_relaxed")
    else:
        rejected_or_lost = rejected
    quarantine = rejected_or_lost.with_columns(
        _bucket().alias("bucket"),
        pl.col("time").alias("point_time_ns"),
        # PostgreSQL text cannot hold NUL: keep the tag readable instead.
        *(pl.col(t).str.replace_all("\x00", "\\x00", literal=True) for t in TAGS),
    ).select(list(QUARANTINE_SCHEMA))
    if checksums is None:
        checksums = client_checksums(raw)
    ledger = (
        _ledger(raw, duplicates, rejected, rollups, checksums, start, end)
        .join(_household_mismatches(rollups, devices), on="bucket", how="left")
        .with_columns(pl.col("household_mismatches").fill_null(0))
    )
    seconds["roll_up"] = time.perf_counter() - t1
    return MinuteBatch(
        rollups=rollups,
        quarantine=quarantine.sort(["bucket", "device_id", "point_time_ns"], nulls_last=True),
        ledger=ledger,
        points_read=points_read,
        duplicates_dropped=duplicates.height,
        seconds=seconds,
    )


def _split_duplicates(raw: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(duplicates, the rest, duplicates whose values differ from the point kept).

    A duplicate repeats a (device, timestamp) of another row. Such points come from different
    series in InfluxDB, e.g. a device reported under two households or with an extra tag. The
    one with the smallest household is kept, ties broken by the values, so the result does not
    depend on the order points arrive in. Hashing finds whether there are any; only then is
    sorting worth it.
    """
    key = pl.struct("device_id", "time")
    has_device = pl.col("device_id").is_not_null()
    if not raw.select((key.is_duplicated() & has_device).any()).item():
        return raw.clear(), raw, raw.clear()
    # The contract's values (and their typed columns); fields outside it do not make a conflict.
    values = contract_columns(raw.columns)
    ordered = raw.sort(["device_id", "time", "household_id", *values], nulls_last=True)
    is_dup = ordered.select(~key.is_first_distinct() & has_device).to_series()
    duplicates, kept = ordered.filter(is_dup), ordered.filter(~is_dup)
    joined = duplicates.join(kept, on=["device_id", "time"], how="left", suffix="_kept")
    differs = pl.any_horizontal(pl.col(c).ne_missing(pl.col(f"{c}_kept")) for c in values)
    conflicting = joined.filter(differs).select(
        *duplicates.columns,
        pl.concat_str(
            pl.lit("duplicate: the device has another point at this time with other values "
                   "(kept the one of household "),
            pl.col("household_id_kept").fill_null("(none)"),
            pl.lit(")"),
        ).alias("reason"),
    )  # fmt: skip
    return duplicates, kept, conflicting


def _roll_up(
    valid: pl.DataFrame, rejected: pl.DataFrame, devices: pl.DataFrame | None
) -> pl.DataFrame:
    keys = ["device_id", "bucket"]
    agg = (
        valid.with_columns(_bucket().alias("bucket"))
        .group_by(keys)
        .agg(
            # The household of the minute's first point, whatever order the points came in.
            pl.col("household_id").get(pl.col("time").arg_min()),
            pl.len().cast(pl.UInt32).alias("sample_count"),
            pl.col("power_w").mean().alias("power_w_avg"),
            pl.col("power_w").min().alias("power_w_min"),
            pl.col("power_w").max().alias("power_w_max"),
            pl.col("energy_wh").sum().alias("energy_wh_sum"),
            pl.col("voltage_v").mean().alias("voltage_v_avg"),
            pl.col("voltage_v").min().alias("voltage_v_min"),
            pl.col("voltage_v").max().alias("voltage_v_max"),
        )
    )
    # Rejected points of a known device count against that device's minute, even when every
    # point of the minute was rejected (then the row has sample_count 0 and no power stats).
    # A poisoned tag is never a known device, and never a household to store.
    poisoned = pl.col("device_id").str.contains("[\x00\ufffd]")
    known = (
        pl.col("device_id").is_in(devices["device_id"].implode())
        if devices is not None
        else pl.lit(True)
    )
    counted = rejected.filter(
        pl.col("device_id").is_not_null()
        & (pl.col("device_id").str.len_chars() > 0)
        & ~poisoned
        & known
    ).with_columns(
        # Only a household the contract would accept may name the row; else the registered one.
        pl.when(
            pl.col("household_id").str.contains("[\x00\ufffd]")
            | ~pl.col("household_id").str.len_chars().is_between(1, MAX_TAG_LENGTH)
        )
        .then(None)
        .otherwise(pl.col("household_id"))
        .alias("household_id")
    )
    rej = (
        counted.with_columns(_bucket().alias("bucket"))
        .group_by(keys)
        .agg(
            pl.len().cast(pl.UInt32).alias("rejected_count"),
            pl.col("household_id")
            .sort_by("time")
            .drop_nulls()
            .first()
            .alias("rejected_household_id"),
        )
    )
    out = agg.join(rej, on=keys, how="full", coalesce=True)
    household = pl.coalesce("household_id", "rejected_household_id")
    if devices is not None:
        out = out.join(
            devices.select("device_id", pl.col("household_id").alias("registered_household_id")),
            on="device_id",
            how="left",
        )
        household = pl.coalesce("household_id", "rejected_household_id", "registered_household_id")
    return (
        out.with_columns(
            household.alias("household_id"),
            pl.col("sample_count").fill_null(0),
            pl.col("energy_wh_sum").fill_null(0.0),
            pl.col("rejected_count").fill_null(0),
        )
        .filter(pl.col("household_id").is_not_null() & (pl.col("household_id") != ""))
        .select(ROLLUP_COLUMNS)
        .sort(keys)
    )


def _household_mismatches(rollups: pl.DataFrame, devices: pl.DataFrame | None) -> pl.DataFrame:
    """Per minute, devices whose points carried another household than their registered one.

    The minute row keeps the tag's household (what the device said); coarser rollups use the one
    registered at each minute (`device_households`), the BI views the one registered now. The
    count is a data-quality figure in the run's metadata.
    """
    if devices is None:
        return pl.DataFrame(schema={"bucket": BUCKET_DTYPE, "household_mismatches": pl.Int64})
    return (
        rollups.join(devices, on="device_id", how="inner", suffix="_registered")
        .filter(pl.col("household_id") != pl.col("household_id_registered"))
        .group_by("bucket")
        .agg(pl.len().cast(pl.Int64).alias("household_mismatches"))
    )


def client_checksums(raw: pl.DataFrame) -> pl.DataFrame:
    """Per-minute count and sum of each main field, computed here from the points themselves."""
    values = raw.select(
        _bucket().alias("bucket"),
        *(
            pl.col(f).cast(pl.Float64, strict=False) if f in raw.columns
            else pl.lit(None, pl.Float64).alias(f)
            for f in FIELDS
        ),
    )  # fmt: skip
    return values.group_by("bucket").agg(
        agg
        for f in FIELDS
        for agg in (
            pl.col(f).is_not_null().sum().cast(pl.Int64).alias(f"{f}_points"),
            pl.col(f).sum().alias(f"{f}_sum"),
        )
    )


def _ledger(
    raw: pl.DataFrame,
    duplicates: pl.DataFrame,
    rejected: pl.DataFrame,
    rollups: pl.DataFrame,
    checksums: pl.DataFrame,
    start: datetime,
    end: datetime,
) -> pl.DataFrame:
    """Per-minute counts and checksums for every minute of the window, zero where nothing was."""

    def per_minute(frame: pl.DataFrame, *aggs: pl.Expr) -> pl.DataFrame:
        return frame.with_columns(_bucket().alias("bucket")).group_by("bucket").agg(*aggs)

    counts = [
        per_minute(raw, pl.len().alias("points_read")),
        per_minute(duplicates, pl.len().alias("duplicates_dropped")),
        per_minute(rejected, pl.len().alias("rejected")),
        rollups.group_by("bucket").agg(pl.len().alias("devices")),
        checksums.select("bucket", *CHECKSUM_COLUMNS),
    ]
    ledger = minute_buckets(start, end)
    for frame in counts:
        ledger = ledger.join(frame, on="bucket", how="left")
    return ledger.select(
        pl.col("bucket"),
        *(
            pl.col(c).fill_null(0.0) if c.endswith("_sum")
            else pl.col(c).fill_null(0).cast(pl.Int64)
            for c in LEDGER_COLUMNS[1:]
        ),
    ).sort("bucket")  # fmt: skip
