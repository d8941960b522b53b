"""device_rollup_1m against real InfluxDB and PostgreSQL servers."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import timedelta

import polars as pl
import psycopg
import pytest

from energy_pipeline import storage
from energy_pipeline.devtools.lineprotocol import encode_points
from energy_pipeline.devtools.simulator import FAULTS, build_fleet, generate_points, inject_faults
from energy_pipeline.influx import InfluxClient
from energy_pipeline.scheduling import MINUTE, partition_key
from energy_pipeline_tests.helpers import (
    base_minute,
    close,
    fetch_quarantine,
    fetch_rollups,
    independent_rollup,
    materialize_minutes,
)

ALL_FAULTS = [f for f in FAULTS if f != "hostile_tags"]
NS = 1_000_000_000


def _write(client: InfluxClient, points: pl.DataFrame) -> list[dict]:
    client.write_lines(encode_points(points))
    return points.to_dicts()


def _messy_minutes(settings, influx_db: InfluxClient, minutes: int = 3, devices: int = 20):
    """Write `minutes` of a hostile fleet with every fault; register the fleet; return what was
    written, the registry and the first minute."""
    fleet = build_fleet(devices, seed=7, devices_per_household=4, hostile_ids=True)
    with psycopg.connect(settings.pg_dsn) as conn:
        storage.upsert_devices(conn, fleet)
    first = base_minute(20)
    points = generate_points(fleet, int(first.timestamp()) * NS, 60 * minutes, seed=7)
    batch = inject_faults(points, ALL_FAULTS, rate=0.02, seed=7)
    written = _write(influx_db, batch.points) + _write(influx_db, batch.late)
    known = dict(zip(fleet["device_id"], fleet["household_id"], strict=True))
    return written, known, first, batch.counts


def _assert_matches(dsn: str, expected: dict) -> None:
    rows = fetch_rollups(dsn)
    assert len(rows) == len(expected)
    for device, bucket, household, n, avg, mn, mx, energy, rejected in rows:
        want = expected[(device, bucket)]
        assert household == want["household_id"]
        assert n == want["sample_count"]
        assert rejected == want["rejected_count"]
        for got, key in ((avg, "power_w_avg"), (mn, "power_w_min"), (mx, "power_w_max"),
                         (energy, "energy_wh_sum")):  # fmt: skip
            assert close(got, want[key]), (device, bucket, key, got, want[key])


def test_rollup_equals_independent_computation_of_messy_points(settings, influx_db):
    written, known, first, counts = _messy_minutes(settings, influx_db)
    assert all(counts[f] > 0 for f in ("duplicate", "negative", "absurd", "missing_field", "late"))

    result = materialize_minutes(settings, first, first + timedelta(minutes=2))

    expected = independent_rollup(written, known)
    _assert_matches(settings.pg_dsn, expected)
    assert {r[0] for r in fetch_rollups(settings.pg_dsn)} == set(known)  # hostile ids round-trip
    quarantine = fetch_quarantine(settings.pg_dsn)
    reasons = {r[-1] for r in quarantine}
    assert "device_id: unknown device" in reasons
    assert {"power_w: missing", "energy_wh: missing"} <= reasons
    assert any("power_w: in_range" in r for r in reasons)
    rejected_known = sum(v["rejected_count"] for v in expected.values())
    unknown_devices = sum(1 for r in quarantine if "unknown device" in r[-1])
    assert len(quarantine) == rejected_known + unknown_devices
    # One materialization per minute, each with that minute's own figures.
    events = [e.materialization for e in result.get_asset_materialization_events()]
    by_minute = {e.partition: {k: v.value for k, v in e.metadata.items()} for e in events}
    assert len(events) == len(by_minute) == 3
    for minute in range(3):
        key = (first + timedelta(minutes=minute)).strftime("%Y-%m-%d-%H:%M")
        bucket = first + timedelta(minutes=minute)
        meta = by_minute[key]
        assert meta["rejected"] == sum(1 for q in quarantine if q[0] == bucket)
        assert meta["rows_written"] == sum(1 for k in expected if k[1] == bucket)
        assert meta["run_minutes"] == 3
        for stage in ("read", "validate", "roll_up", "write"):
            assert meta[f"run_seconds_{stage}"] >= 0


def test_rerun_gives_identical_rows_and_ranged_run_equals_minute_runs(settings, influx_db):
    _, _, first, _ = _messy_minutes(settings, influx_db)
    last = first + timedelta(minutes=2)
    materialize_minutes(settings, first, last)
    rollups, quarantine = fetch_rollups(settings.pg_dsn), fetch_quarantine(settings.pg_dsn)

    materialize_minutes(settings, first, last)
    assert fetch_rollups(settings.pg_dsn) == rollups
    assert fetch_quarantine(settings.pg_dsn) == quarantine

    for i in range(3):
        minute = first + timedelta(minutes=i)
        materialize_minutes(settings, minute, minute)
    assert fetch_rollups(settings.pg_dsn) == rollups
    assert fetch_quarantine(settings.pg_dsn) == quarantine


def test_two_runs_of_the_same_minutes_at_once_leave_no_duplicates(settings, influx_db):
    written, known, first, _ = _messy_minutes(settings, influx_db)
    last = first + timedelta(minutes=2)
    results = []

    def run() -> None:
        results.append(materialize_minutes(settings, first, last, raise_on_error=False).success)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True, True]
    _assert_matches(settings.pg_dsn, independent_rollup(written, known))
    with psycopg.connect(settings.pg_dsn) as conn:
        ledger = conn.execute("SELECT count(*) FROM energy.rollup_minutes").fetchone()[0]
    assert ledger == 3


def test_failure_mid_write_keeps_previous_rows_and_next_run_repairs(
    settings, influx_db, monkeypatch
):
    written, known, first, _ = _messy_minutes(settings, influx_db, minutes=1)
    materialize_minutes(settings, first, first)
    before = fetch_rollups(settings.pg_dsn), fetch_quarantine(settings.pg_dsn)

    # New points arrive for the minute; the next run dies after deleting and copying rollups.
    fleet = build_fleet(20, seed=7, devices_per_household=4, hostile_ids=True)
    extra = generate_points(fleet.head(3), int(first.timestamp()) * NS + NS // 2, 1, seed=9)
    extra = extra.with_columns(pl.col("time") + NS // 2)
    written += _write(influx_db, extra)
    real_copy = storage.copy_frame

    def copy_then_fail(cur, table, frame, **kwargs):
        real_copy(cur, table, frame, **kwargs)
        if table == "device_rollup_1m":
            raise RuntimeError("injected failure after writing rollups")

    monkeypatch.setattr(storage, "copy_frame", copy_then_fail)
    assert not materialize_minutes(settings, first, first, raise_on_error=False).success
    assert (fetch_rollups(settings.pg_dsn), fetch_quarantine(settings.pg_dsn)) == before

    monkeypatch.setattr(storage, "copy_frame", real_copy)
    materialize_minutes(settings, first, first)
    _assert_matches(settings.pg_dsn, independent_rollup(written, known))
    assert fetch_rollups(settings.pg_dsn) != before[0]


def test_injection_through_tag_values_does_no_harm(settings, influx_db):
    written, known, first, _ = _messy_minutes(settings, influx_db, minutes=1)
    materialize_minutes(settings, first, first)
    hostile = "x' OR 1=1; DROP MEASUREMENT telemetry; --"
    assert hostile in known
    # The measurement and every point survive; a bound-parameter query finds exactly its points.
    measurements = influx_db.query_json("SHOW MEASUREMENTS")[0]["series"][0]["values"]
    assert ["telemetry"] in measurements
    frame = influx_db.query_frame(
        'SELECT "power_w" FROM "telemetry" WHERE "device_id" = $d', {"d": hostile}
    )
    assert frame.height == len({p["time"] for p in written if p["device_id"] == hostile})
    assert frame.height > 0


def test_an_over_long_household_tag_on_rejected_points_does_not_stop_the_minute(
    settings, influx_db
):
    # dev-1's only point is rejected and carries a household tag too long for any index; the
    # row takes the registered household, and dev-2's good points are rolled up beside it.
    with psycopg.connect(settings.pg_dsn) as conn:
        storage.upsert_devices(
            conn, pl.DataFrame({"device_id": ["dev-1", "dev-2"], "household_id": ["h1", "h2"]})
        )
    first = base_minute(30)
    t0 = int(first.timestamp()) * NS
    long_tag = "".join(f"{i:04d}" for i in range(2_000))  # 8,000 characters, no repeats to pack
    influx_db.write_lines(
        [f"telemetry,device_id=dev-2,household_id=h2 power_w=100,energy_wh=1 {t0 + i * NS}"
         for i in range(10)]
        + [f"telemetry,device_id=dev-1,household_id={long_tag} power_w=-1,energy_wh=1 {t0}"]
    )  # fmt: skip
    materialize_minutes(settings, first, first)
    assert [r[:4] + r[8:9] for r in fetch_rollups(settings.pg_dsn)] == [
        ("dev-1", first, "h1", 0, 1),
        ("dev-2", first, "h2", 10, 0),
    ]
    quarantined = fetch_quarantine(settings.pg_dsn)
    assert len(quarantined) == 1 and long_tag in quarantined[0]


def _dev1_points(settings, influx_db: InfluxClient, fields: list[str]):
    """Register dev-1 in h1 and write one point a second of it with each field set; return the
    minute they are in."""
    with psycopg.connect(settings.pg_dsn) as conn:
        storage.upsert_devices(conn, pl.DataFrame({"device_id": ["dev-1"], "household_id": ["h1"]}))
    first = base_minute(30)
    t0 = int(first.timestamp()) * NS
    influx_db.write_lines(
        [
            f"telemetry,device_id=dev-1,household_id=h1 {f} {t0 + i * NS}"
            for i, f in enumerate(fields)
        ]
    )
    return first


def test_points_carrying_only_fields_outside_the_contract_are_quarantined(settings, influx_db):
    first = _dev1_points(
        settings, influx_db,
        ["power_w=100,energy_wh=1,temperature_c=21.5",  # an extra field: fine
         "Power_W=10,Energy_Wh=1",  # misspelt fields only
         "temperature_c=22", 'firmware="1.2"',
         'note=""'],  # an empty text is all it carries
    )  # fmt: skip
    materialize_minutes(settings, first, first)
    assert [r[:4] + r[8:9] for r in fetch_rollups(settings.pg_dsn)] == [
        ("dev-1", first, "h1", 1, 4)
    ]
    reasons = [r[-1] for r in fetch_quarantine(settings.pg_dsn)]
    missing = "energy_wh: missing; {}power_w: missing"
    assert reasons == [
        missing.format("fields outside the contract: Energy_Wh, Power_W; "),
        missing.format("fields outside the contract: temperature_c; "),
        missing.format("fields outside the contract: firmware; "),
        missing.format(""),
    ]


def test_fields_named_unread_are_not_read(settings, influx_db):
    first = _dev1_points(
        settings, influx_db, ["power_w=100,energy_wh=1,rssi=-61", "rssi=-60", "Power_W=10"]
    )
    materialize_minutes(replace(settings, unread_fields=("rssi",)), first, first)
    # The rssi-only point is not seen; the misspelt one still is.
    assert [r[:4] + r[8:9] for r in fetch_rollups(settings.pg_dsn)] == [
        ("dev-1", first, "h1", 1, 1)
    ]
    assert [r[-1] for r in fetch_quarantine(settings.pg_dsn)] == [
        "energy_wh: missing; fields outside the contract: Power_W; power_w: missing"
    ]


def test_devices_tagged_with_another_household_are_counted_on_their_minute(settings, influx_db):
    fleet = build_fleet(8, seed=7, devices_per_household=4)
    registered = dict(zip(fleet["device_id"], fleet["household_id"], strict=True))
    with psycopg.connect(settings.pg_dsn) as conn:
        storage.upsert_devices(conn, fleet)
    first = base_minute(20)
    first_ns = int(first.timestamp()) * NS
    # (minute, device) → the household tag its points carry instead of the registered one: the
    # other registered household, or one the registry does not know.
    retagged = {
        (0, "dev-000000"): "hh-00001",
        (0, "dev-000005"): "hh-elsewhere",
        (1, "dev-000000"): "hh-00001",
    }
    minute_of = (pl.col("time") - first_ns) // (60 * NS)
    household = pl.col("household_id")
    for (minute, device), tag in retagged.items():
        household = (
            pl.when((minute_of == minute) & (pl.col("device_id") == device))
            .then(pl.lit(tag))
            .otherwise(household)
        )
    points = generate_points(fleet, first_ns, 3 * 60, seed=7)
    _write(influx_db, points.with_columns(household.alias("household_id")))

    result = materialize_minutes(settings, first, first + 2 * MINUTE)

    events = [e.materialization for e in result.get_asset_materialization_events()]
    assert {e.partition: e.metadata["household_mismatches"].value for e in events} == {
        partition_key(first): 2,
        partition_key(first + MINUTE): 1,
        partition_key(first + 2 * MINUTE): 0,
    }
    # The minute row keeps the tag; the BI view gives the registered household next to it.
    with psycopg.connect(settings.pg_dsn) as conn:
        rows = conn.execute(
            "SELECT r.device_id, r.bucket, r.household_id, v.household_id, v.tag_household_id "
            "FROM energy.device_rollup_1m r "
            "JOIN energy.bi_device_minute v USING (device_id, bucket)"
        ).fetchall()
    assert len(rows) == 3 * len(registered)
    for device, bucket, minute_household, view_household, view_tag in rows:
        tag = retagged.get(((bucket - first) // MINUTE, device), registered[device])
        assert (minute_household, view_household, view_tag) == (tag, registered[device], tag)


def test_minute_without_points_writes_empty_ledger_row(settings, influx_db):
    minute = base_minute(30)
    result = materialize_minutes(settings, minute, minute)
    assert result.success
    assert fetch_rollups(settings.pg_dsn) == []
    with psycopg.connect(settings.pg_dsn) as conn:
        row = conn.execute("SELECT points_read, devices FROM energy.rollup_minutes").fetchall()
    assert row == [(0, 0)]


@pytest.mark.parametrize("chunk_minutes", [1, 2, 5])
def test_chunk_size_does_not_change_results(settings, influx_db, chunk_minutes):
    from dataclasses import replace

    written, known, first, _ = _messy_minutes(settings, influx_db, minutes=3, devices=10)
    materialize_minutes(replace(settings, chunk_minutes=chunk_minutes), first,
                        first + timedelta(minutes=2))  # fmt: skip
    _assert_matches(settings.pg_dsn, independent_rollup(written, known))


def test_each_chunk_commits_on_its_own(settings, influx_db, monkeypatch):
    from dataclasses import replace

    written, known, first, _ = _messy_minutes(settings, influx_db, minutes=2, devices=10)
    real_copy = storage.copy_frame
    copies = {"rollups": 0}

    def fail_second_chunk(cur, table, frame, **kwargs):
        if table == "device_rollup_1m":
            copies["rollups"] += 1
            if copies["rollups"] == 2:
                raise RuntimeError("injected failure in the second chunk")
        real_copy(cur, table, frame, **kwargs)

    monkeypatch.setattr(storage, "copy_frame", fail_second_chunk)
    one_minute_chunks = replace(settings, chunk_minutes=1)
    result = materialize_minutes(
        one_minute_chunks, first, first + timedelta(minutes=1), raise_on_error=False
    )
    assert not result.success
    with psycopg.connect(settings.pg_dsn) as conn:
        ledger = [r[0] for r in conn.execute("SELECT bucket FROM energy.rollup_minutes")]
    assert ledger == [first]  # the first chunk stayed committed; the second left nothing
    expected = independent_rollup(written, known)
    assert {(r[0], r[1]) for r in fetch_rollups(settings.pg_dsn)} == {
        k for k in expected if k[1] == first
    }
