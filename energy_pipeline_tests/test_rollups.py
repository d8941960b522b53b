"""roll_up_minutes as a pure function: its result must not depend on the order points arrive in.

Reads `GROUP BY device_id` hand points over device by device, and series slices are concatenated;
nothing downstream may rely on either order.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from energy_pipeline.rollups import roll_up_minutes

START = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
NS = 1_000_000_000


def _points() -> pl.DataFrame:
    t0 = int(START.timestamp()) * NS
    rows = [
        # dev-1 reported under two households at the same second: one duplicate, hh-a kept.
        (t0, "5.0", "1.0", "dev-1", "hh-b"),
        (t0, "7.0", "2.0", "dev-1", "hh-a"),
        (t0 + NS, "9.0", "1.5", "dev-1", "hh-a"),
        # dev-2 moves household within the minute: the minute takes its earliest point's.
        (t0 + 2 * NS, "3.0", "0.5", "dev-2", "hh-c"),
        (t0 + 5 * NS, "4.0", "0.5", "dev-2", "hh-d"),
        # Bad values and an unknown device go to quarantine.
        (t0 + 3 * NS, "abc", "0.5", "dev-2", "hh-c"),
        (t0 + 4 * NS, "-1.0", "0.5", "dev-1", "hh-a"),
        (t0 + 6 * NS, "1.0", "0.1", "dev-x", "hh-x"),
        (t0 + 7 * NS, "2.0", None, "dev-2", "hh-c"),
        # The next minute.
        (t0 + 61 * NS, "6.0", "0.2", "dev-1", "hh-a"),
    ]
    return pl.DataFrame(
        rows,
        schema={
            "time": pl.Int64,
            "power_w": pl.String,
            "energy_wh": pl.String,
            "device_id": pl.String,
            "household_id": pl.String,
        },  # fmt: skip
        orient="row",
    )


DEVICES = pl.DataFrame({"device_id": ["dev-1", "dev-2"], "household_id": ["hh-a", "hh-c"]})


def _without_duplicate(points: pl.DataFrame) -> pl.DataFrame:
    # With no duplicate the frame is never sorted, so arrival order reaches the roll-up.
    return points.filter(pl.col("household_id") != "hh-b")


@pytest.mark.parametrize("duplicates", [1, 0])
def test_result_does_not_depend_on_point_order(duplicates):
    points = _points() if duplicates else _without_duplicate(_points())
    end = START + timedelta(minutes=2)
    expected = roll_up_minutes(points, START, end, DEVICES)
    for seed in range(5):
        shuffled = points.sample(fraction=1.0, shuffle=True, seed=seed)
        got = roll_up_minutes(shuffled, START, end, DEVICES)
        assert_frame_equal(got.rollups, expected.rollups)
        assert_frame_equal(got.quarantine, expected.quarantine)
        assert_frame_equal(got.ledger, expected.ledger)
        assert got.duplicates_dropped == expected.duplicates_dropped == duplicates


def test_duplicate_keeps_smallest_household_and_minute_takes_earliest_household():
    points = _points()
    batch = roll_up_minutes(points.reverse(), START, START + timedelta(minutes=2), DEVICES)
    first = batch.rollups.filter(pl.col("bucket") == START)
    dev1 = first.filter(pl.col("device_id") == "dev-1").row(0, named=True)
    # hh-a's 7.0 W kept at t0 (hh-b's 5.0 W dropped), 9.0 W at t0+1; -1.0 W rejected.
    assert (dev1["household_id"], dev1["sample_count"], dev1["power_w_avg"]) == ("hh-a", 2, 8.0)
    assert dev1["rejected_count"] == 1
    dev2 = first.filter(pl.col("device_id") == "dev-2").row(0, named=True)
    assert (dev2["household_id"], dev2["sample_count"], dev2["rejected_count"]) == ("hh-c", 2, 2)
    assert set(batch.quarantine["device_id"]) == {"dev-1", "dev-2", "dev-x"}
    assert batch.ledger["duplicates_dropped"].to_list() == [1, 0]


def test_minute_household_is_the_earliest_points_without_duplicates():
    points = _without_duplicate(_points()).reverse()  # hh-d's point now comes first
    batch = roll_up_minutes(points, START, START + timedelta(minutes=2), DEVICES)
    dev2 = batch.rollups.filter((pl.col("bucket") == START) & (pl.col("device_id") == "dev-2"))
    assert dev2["household_id"].to_list() == ["hh-c"]


def test_devices_reporting_another_household_than_registered_are_counted_per_minute():
    registry = pl.DataFrame({"device_id": ["dev-1", "dev-2"], "household_id": ["hh-z", "hh-c"]})
    batch = roll_up_minutes(_points(), START, START + timedelta(minutes=2), registry)
    # dev-1 says hh-a in both minutes; dev-2's minute starts with hh-c, its registered household.
    assert batch.ledger["household_mismatches"].to_list() == [1, 1]
    assert set(batch.rollups["household_id"]) == {"hh-a", "hh-c"}  # the minute keeps the tag
    assert roll_up_minutes(_points(), START, START + timedelta(minutes=2), DEVICES).ledger[
        "household_mismatches"
    ].to_list() == [0, 0]


def test_duplicates_under_the_same_household_keep_the_same_point_in_any_order():
    # Two series of dev-1 in hh-a (an extra tag told them apart) disagree at t0.
    t0 = int(START.timestamp()) * NS
    points = pl.DataFrame(
        [(t0, "100.0", "1.0", "dev-1", "hh-a"), (t0, "200.0", "2.0", "dev-1", "hh-a"),
         (t0 + NS, "150.0", "1.0", "dev-1", "hh-a")],
        schema=["time", "power_w", "energy_wh", "device_id", "household_id"], orient="row",
    )  # fmt: skip
    end = START + timedelta(minutes=1)
    results = {
        (
            batch.rollups.row(0, named=True)["power_w_avg"],
            tuple(batch.quarantine["power_w"]),
            tuple(batch.quarantine["reason"]),
        )
        for batch in (roll_up_minutes(p, START, end, DEVICES) for p in (points, points.reverse()))
    }
    assert len(results) == 1
    avg, lost, reasons = results.pop()
    # The smaller values are kept; the point that lost is quarantined with the reason.
    assert avg == 125.0
    assert lost == (200.0,)
    assert reasons == (
        "duplicate: the device has another point at this time with other values "
        "(kept the one of household hh-a)",
    )


def test_duplicates_with_equal_values_are_counted_not_quarantined():
    t0 = int(START.timestamp()) * NS
    points = pl.DataFrame(
        [(t0, "100.0", "1.0", "dev-1", "hh-a"), (t0, "100.0", "1.0", "dev-1", "hh-b")],
        schema=["time", "power_w", "energy_wh", "device_id", "household_id"], orient="row",
    )  # fmt: skip
    batch = roll_up_minutes(points, START, START + timedelta(minutes=1), DEVICES)
    assert batch.duplicates_dropped == 1 and batch.quarantine.is_empty()
    assert batch.rollups["household_id"].to_list() == ["hh-a"]


def test_a_rejected_points_household_names_the_row_only_if_the_contract_accepts_it():
    t0 = int(START.timestamp()) * NS
    long_household = "h" * 8_000
    points = pl.DataFrame(
        [(t0, "-5.0", "1.0", "dev-1", long_household), (t0, "-5.0", "1.0", "dev-2", "")],
        schema=["time", "power_w", "energy_wh", "device_id", "household_id"], orient="row",
    )  # fmt: skip
    registry = pl.DataFrame({"device_id": ["dev-1", "dev-2"], "household_id": ["hh-a", "hh-c"]})
    batch = roll_up_minutes(points, START, START + timedelta(minutes=1), registry)
    rows = batch.rollups.select("device_id", "household_id", "sample_count", "rejected_count")
    assert rows.rows() == [("dev-1", "hh-a", 0, 1), ("dev-2", "hh-c", 0, 1)]
    assert batch.quarantine["household_id"].to_list() == [long_household, ""]


def test_a_minute_may_hold_more_than_a_million_points_of_one_device():
    t0 = int(START.timestamp()) * NS
    n = 1_000_001
    points = pl.DataFrame(
        {
            "time": pl.int_range(t0, t0 + n, eager=True),
            "power_w": pl.repeat("10.0", n, eager=True),
            "energy_wh": pl.repeat("0.0", n, eager=True),
            "device_id": pl.repeat("dev-1", n, eager=True),
            "household_id": pl.repeat("hh-a", n, eager=True),
        }
    )
    batch = roll_up_minutes(points, START, START + timedelta(minutes=1), DEVICES)
    assert batch.rollups["sample_count"].to_list() == [n]


def test_a_point_carrying_only_fields_outside_the_contract_is_quarantined_naming_them():
    t0 = int(START.timestamp()) * NS
    points = pl.DataFrame(
        [(t0, "10.0", "1.0", None, "21.5", "dev-1", "hh-a"),  # an extra field beside ours: fine
         (t0 + NS, None, None, "10.0", None, "dev-1", "hh-a"),  # a misspelt power field only
         (t0 + 2 * NS, None, None, "12.0", "22.0", "dev-1", "hh-a")],
        schema=["time", "power_w", "energy_wh", "extra:Power_W:float", "extra:temperature_c:float",
                "device_id", "household_id"],
        orient="row",
    )  # fmt: skip
    batch = roll_up_minutes(points, START, START + timedelta(minutes=1), DEVICES)
    row = batch.rollups.row(0, named=True)
    assert (row["sample_count"], row["rejected_count"], row["power_w_avg"]) == (1, 2, 10.0)
    assert batch.quarantine["reason"].to_list() == [
        "energy_wh: missing; fields outside the contract: Power_W; power_w: missing",
        "energy_wh: missing; fields outside the contract: Power_W, temperature_c; power_w: missing",
    ]
    assert batch.ledger["points_read"].to_list() == [3]


def test_duplicates_differing_only_outside_the_contract_are_not_a_conflict():
    t0 = int(START.timestamp()) * NS
    points = pl.DataFrame(
        [(t0, "100.0", "1.0", None, "dev-1", "hh-a"), (t0, "100.0", "1.0", "-61", "dev-1", "hh-a")],
        schema=["time", "power_w", "energy_wh", "extra:rssi:float", "device_id", "household_id"],
        orient="row",
    )  # fmt: skip
    batch = roll_up_minutes(points, START, START + timedelta(minutes=1), DEVICES)
    assert batch.duplicates_dropped == 1 and batch.quarantine.is_empty()
