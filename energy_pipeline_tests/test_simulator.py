"""Pure tests of the telemetry simulator: fleets, generated points and injected faults."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl
import pytest

from energy_pipeline.devtools.lineprotocol import encode_points, escape_tag
from energy_pipeline.devtools.simulator import (
    ABSURD_POWER_W,
    FAULTS,
    HOSTILE_DEVICE_IDS,
    HOSTILE_HOUSEHOLD_IDS,
    POINT_COLUMNS,
    PROFILES,
    build_fleet,
    generate_points,
    inject_faults,
)

START = int(datetime(2026, 1, 14, tzinfo=UTC).timestamp()) * 1_000_000_000


@pytest.fixture(scope="module")
def fleet() -> pl.DataFrame:
    return build_fleet(100, seed=7)


@pytest.fixture(scope="module")
def day(fleet: pl.DataFrame) -> pl.DataFrame:
    """A whole day for every device, joined with the device's profile and timezone."""
    points = generate_points(fleet, START, 86_400, seed=7)
    return points.join(fleet.select("device_id", "profile", "timezone"), on="device_id")


def test_fleet_ids_and_households() -> None:
    fleet = build_fleet(12, devices_per_household=5)
    assert fleet.columns == [
        "device_id", "household_id", "name", "model", "location", "timezone", "profile"
    ]  # fmt: skip
    assert fleet["device_id"].to_list()[:2] == ["dev-000000", "dev-000001"]
    assert fleet["household_id"].unique().sort().to_list() == ["hh-00000", "hh-00001", "hh-00002"]
    assert fleet.group_by("household_id").agg(pl.col("timezone").n_unique())["timezone"].max() == 1
    assert set(fleet["profile"]) <= set(PROFILES)


def test_large_fleet_uses_every_profile() -> None:
    assert set(build_fleet(500)["profile"]) == set(PROFILES)


@pytest.mark.parametrize("devices", [0, 1, 3, 5, 6, 100])
def test_hostile_ids_never_exceed_fleet_and_are_encodable(devices: int) -> None:
    fleet = build_fleet(devices, hostile_ids=True)
    hostile = fleet.filter(pl.col("device_id").is_in(HOSTILE_DEVICE_IDS))
    assert hostile.height == min(5, devices)
    assert fleet["device_id"].n_unique() == devices
    assert set(hostile["household_id"]) <= set(HOSTILE_HOUSEHOLD_IDS)
    for value in [*fleet["device_id"], *fleet["household_id"]]:
        escape_tag(value)  # raises if not representable
    assert encode_points(generate_points(fleet, START, 2)).count(b"\n") == max(0, 2 * devices - 1)


def test_hostile_ids_cover_the_nasty_cases() -> None:
    ids = "".join(HOSTILE_DEVICE_IDS + HOSTILE_HOUSEHOLD_IDS)
    for needle in (" ", ",", "=", '"', "'", ";", "\\", "Küche", "冷蔵庫", "🔌", "DROP MEASUREMENT"):
        assert needle in ids


@pytest.mark.parametrize("seconds", [0, 1, 60])
def test_shape_columns_and_order(fleet: pl.DataFrame, seconds: int) -> None:
    points = generate_points(fleet, START + 123_456_789, seconds)
    assert points.columns == list(POINT_COLUMNS)
    assert points.dtypes == [pl.Int64, pl.String, pl.String, pl.Float64, pl.Float64, pl.Float64]
    assert points.height == fleet.height * seconds
    assert points.null_count().sum_horizontal().item() == 0
    if seconds:
        assert points["time"].min() == START  # rounded down to a whole second
        assert (points["time"] % 1_000_000_000 == 0).all()
        assert points["time"].is_sorted()
        assert points.select(pl.struct("time", "device_id").is_unique().all()).item()


def test_deterministic_and_seed_dependent(fleet: pl.DataFrame) -> None:
    first = generate_points(fleet, START, 30, seed=1)
    assert first.equals(generate_points(fleet, START, 30, seed=1))
    assert not first.equals(generate_points(fleet, START, 30, seed=2))


def test_overlapping_windows_agree(fleet: pl.DataFrame) -> None:
    whole = generate_points(fleet, START, 60)
    later = generate_points(fleet, START + 30 * 1_000_000_000, 30)
    assert whole.filter(pl.col("time") >= START + 30 * 1_000_000_000).equals(later)


def test_energy_is_power_over_one_second(day: pl.DataFrame) -> None:
    assert (day["power_w"] >= 0).all()
    assert (day["energy_wh"] == day["power_w"] / 3600).all()


@pytest.mark.parametrize(
    ("profile", "low", "high", "zero_share"),
    [
        ("fridge", 0.5, 190, (0.0, 0.0)),
        ("hvac", 1, 3400, (0.0, 0.0)),
        ("ev_charger", 0, 11_500, (0.8, 1.0)),
        ("lighting", 0, 230, (0.5, 0.95)),
        ("standby", 1, 20, (0.0, 0.0)),
        ("washer", 0.1, 2600, (0.0, 0.0)),
        ("dishwasher", 0.1, 2500, (0.0, 0.0)),
    ],
)
def test_profile_ranges(
    day: pl.DataFrame, profile: str, low: float, high: float, zero_share: tuple
) -> None:
    power = day.filter(pl.col("profile") == profile)["power_w"]
    assert power.len() > 0
    assert low <= power.min() and power.max() <= high
    assert zero_share[0] <= (power == 0).mean() <= zero_share[1]


def test_fridge_duty_cycle(day: pl.DataFrame) -> None:
    fridge = day.filter(pl.col("profile") == "fridge")["power_w"]
    assert 0.3 <= (fridge > 50).mean() <= 0.45


def test_ev_sessions_are_7_to_11_kw(day: pl.DataFrame) -> None:
    charging = day.filter((pl.col("profile") == "ev_charger") & (pl.col("power_w") > 0))
    assert charging.height > 0
    assert charging["power_w"].min() > 6500 and charging["power_w"].max() < 11_500


def test_hvac_and_lighting_follow_local_time(day: pl.DataFrame) -> None:
    local_hour = (
        pl.from_epoch(pl.col("time"), time_unit="ns")
        .dt.replace_time_zone("UTC")
        .dt.convert_time_zone("Europe/Berlin")
        .dt.hour()
    )
    berlin = day.filter(pl.col("timezone") == "Europe/Berlin").with_columns(hour=local_hour)
    by_hour = berlin.group_by("profile", "hour").agg(pl.col("power_w").mean())

    def mean(profile: str, hour: int) -> float:
        row = by_hour.filter((pl.col("profile") == profile) & (pl.col("hour") == hour))
        return row["power_w"].item()

    assert mean("hvac", 7) > 2 * mean("hvac", 2)
    assert mean("hvac", 19) > 2 * mean("hvac", 13)
    assert mean("lighting", 20) > 10 * max(mean("lighting", 14), 0.1)


def test_voltage_by_region(day: pl.DataFrame) -> None:
    stats = day.group_by(pl.col("timezone").str.starts_with("America/").alias("us")).agg(
        mean=pl.col("voltage_v").mean(), sd=pl.col("voltage_v").std()
    )
    eu = stats.filter(~pl.col("us")).row(0, named=True)
    assert 229.5 < eu["mean"] < 230.5 and 1.5 < eu["sd"] < 2.5
    us = stats.filter(pl.col("us")).row(0, named=True)
    assert 119.5 < us["mean"] < 120.5


@pytest.fixture(scope="module")
def batch(fleet: pl.DataFrame) -> pl.DataFrame:
    return generate_points(fleet, START, 60)


@pytest.mark.parametrize(
    ("fault", "touched"),
    [
        ("negative", lambda p: (p["power_w"] < 0).sum()),
        ("absurd", lambda p: (p["power_w"] == ABSURD_POWER_W).sum()),
        ("missing_field", lambda p: p.select(pl.col("power_w", "energy_wh").null_count()).sum_horizontal().item()),  # noqa: E501
        ("unknown_device", lambda p: p["device_id"].str.starts_with("ghost-").sum()),
        ("duplicate", lambda p: p.height - p.unique().height),
    ],
)  # fmt: skip
def test_row_faults_touch_counted_rows(batch: pl.DataFrame, fault: str, touched) -> None:
    result = inject_faults(batch, [fault], rate=0.01)
    assert result.counts == {fault: 60}
    assert touched(result.points) == 60
    assert result.points.columns == list(POINT_COLUMNS)


def test_late_rows_move_out(batch: pl.DataFrame) -> None:
    result = inject_faults(batch, ["late"], rate=0.02)
    assert result.counts == {"late": 120} and result.late.height == 120
    assert result.points.height == batch.height - 120
    assert (
        pl.concat([result.points, result.late])
        .sort("time", "device_id")
        .equals(batch.sort("time", "device_id"))
    )


def test_out_of_order_shuffles(batch: pl.DataFrame) -> None:
    result = inject_faults(batch, ["out_of_order"])
    assert not result.points["time"].is_sorted()
    assert result.counts["out_of_order"] > 0
    assert result.points.sort("time", "device_id").equals(batch.sort("time", "device_id"))


def test_missing_field_never_empties_a_point(batch: pl.DataFrame) -> None:
    points = inject_faults(batch, ["missing_field"], rate=0.1).points
    assert points["power_w"].null_count() == 300 and points["energy_wh"].null_count() == 300
    encode_points(points)  # every point keeps at least one field


def test_all_faults_together_are_disjoint_and_deterministic(batch: pl.DataFrame) -> None:
    first = inject_faults(batch, FAULTS, rate=0.01, seed=3)
    again = inject_faults(batch, FAULTS, rate=0.01, seed=3)
    assert first.points.equals(again.points) and first.counts == again.counts
    points = first.points
    assert (points["power_w"] < 0).sum() == first.counts["negative"] == 60
    assert (points["power_w"] == ABSURD_POWER_W).sum() == first.counts["absurd"]
    assert first.late.height == first.counts["late"]
    assert points.height == batch.height - 60 + 60 + 60  # late out, duplicates and ghosts in
    assert first.counts["hostile_tags"] == 0


def test_hostile_tags_is_a_fleet_option() -> None:
    hostile = generate_points(build_fleet(20, hostile_ids=True), START, 10)
    result = inject_faults(hostile, ["hostile_tags"])
    assert result.points.equals(hostile)
    assert result.counts["hostile_tags"] > 0


def test_zero_rate_touches_nothing(batch: pl.DataFrame) -> None:
    result = inject_faults(batch, ["negative", "late", "duplicate"], rate=0.0)
    assert result.points.equals(batch) and result.late.height == 0
    assert result.counts == {"negative": 0, "late": 0, "duplicate": 0}


@pytest.mark.parametrize("rate", [0.5, -0.1, 1.5])
def test_rate_out_of_bounds_rejected(batch: pl.DataFrame, rate: float) -> None:
    with pytest.raises(ValueError, match="more rows|rate must be"):
        inject_faults(batch, ["negative", "absurd", "late"], rate=rate)


@pytest.mark.parametrize("bad", [["explode"], ["negative", "bogus"]])
def test_unknown_fault_lists_valid_ones(batch: pl.DataFrame, bad: list[str]) -> None:
    with pytest.raises(ValueError, match="valid: duplicate, out_of_order"):
        inject_faults(batch, bad)


def test_unknown_profile_rejected(fleet: pl.DataFrame) -> None:
    with pytest.raises(ValueError, match="unknown profile"):
        generate_points(fleet.with_columns(profile=pl.lit("toaster")), START, 1)
