"""Daily household reports against real PostgreSQL: the computation against an independent Python
calculation (three zones, a DST day, a :45 offset, a gap), tariffs, idempotent re-runs, the kWh
check, the asset and sensor, and the pure planner."""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import dagster as dg
import polars as pl
import psycopg
import pytest
from psycopg import sql

from energy_pipeline import cli, storage
from energy_pipeline.defs.reports.assets import ReportOutputResource, household_daily_report
from energy_pipeline.defs.reports.checks import kwh_matches_five_minute_rows
from energy_pipeline.defs.reports.partitions import DAILY_REPORT_PARTITIONS
from energy_pipeline.defs.reports.sensors import ORIGIN, ORIGIN_TAG, build_report_sensor
from energy_pipeline.devtools.services import LocalPostgres
from energy_pipeline.hierarchy import DEVICE_1H, HOUSEHOLD_5M, replace_windows
from energy_pipeline.reports import pages, tariffs
from energy_pipeline.reports.compute import (
    compute_reports,
    day_span,
    kwh_checks,
    replace_day,
    zone_notes,
)
from energy_pipeline.reports.planning import (
    DayRun,
    ReportDayState,
    plan_report_days,
    report_day_states,
)
from energy_pipeline.reports.render import household_html
from energy_pipeline.resources import PostgresResource
from energy_pipeline_tests.conftest import TEMPLATE_DB, database_from
from energy_pipeline_tests.helpers import close

MINUTE = timedelta(minutes=1)
DST_DAY = date(2026, 3, 29)  # Europe/Berlin springs forward: a 23-hour day
NORMAL_DAY = date(2026, 3, 27)
FIRST = datetime(2026, 3, 19, tzinfo=UTC)
LAST = datetime(2026, 3, 30, 13, tzinfo=UTC)
HOSTILE = '<script>alert("x")</script> & "quotes" \u00e9'
# device_id: (household, name, zone)
DEVICES = {
    "b1": ("hh-berlin", HOSTILE, "Europe/Berlin"),
    "b2": ("hh-berlin", "Heat pump", "Europe/Berlin"),
    "b3": ("hh-berlin", "Oven", "Europe/Berlin"),
    "b4": ("hh-berlin", "Kettle", "Europe/Berlin"),
    "k1": ("hh-kat", "Water pump", "Asia/Kathmandu"),
    "k2": ("hh-kat", "Fan", "Asia/Kathmandu"),
    "n1": ("hh-ny", "Dryer", "America/New_York"),
}
ZONES = {h: z for h, _, z in DEVICES.values()}
# hh-kat sends nothing for 3 hours of its local DST_DAY.
KAT_GAP = (
    datetime.combine(DST_DAY, time(4), ZoneInfo("Asia/Kathmandu")).astimezone(UTC),
    datetime.combine(DST_DAY, time(7), ZoneInfo("Asia/Kathmandu")).astimezone(UTC),
)
TARIFF_YAML = """
tariffs:
  - id: flat-eur
    currency: EUR
    default: true
    bands: [{start: "00:00", end: "24:00", price_per_kwh: 0.30}]
  - id: tou-eur
    currency: EUR
    bands:
      - {start: "22:00", end: "07:00", price_per_kwh: 0.18}
      - {start: "07:00", end: "22:00", price_per_kwh: 0.34}
  - id: flat-usd
    currency: USD
    bands: [{start: "00:00", end: "24:00", price_per_kwh: 0.21}]
assignments:
  - {household_id: hh-berlin, tariff: tou-eur, from: 2026-01-01}
  - {household_id: hh-ny, tariff: flat-usd, from: 2026-03-01}
  - {household_id: hh-ny, tariff: tou-eur, from: 2026-04-01}
"""
PRICES = {
    "hh-berlin": lambda t: Decimal("0.18") if t < time(7) or t >= time(22) else Decimal("0.34"),
    "hh-kat": lambda t: Decimal("0.30"),
    "hh-ny": lambda t: Decimal("0.21"),
}
CURRENCY = {"hh-berlin": "EUR", "hh-kat": "EUR", "hh-ny": "USD"}


def minute_rows(seed: int = 7) -> list[dict]:
    """About 60% of each device's minutes, some with every sample rejected."""
    rng = random.Random(seed)
    rows = []
    m = FIRST
    while m < LAST:
        for device, (household, _, _) in DEVICES.items():
            if rng.random() > 0.6 or (household == "hh-kat" and KAT_GAP[0] <= m < KAT_GAP[1]):
                continue
            samples = 0 if rng.random() < 0.05 else rng.randint(1, 60)
            energy = rng.uniform(0, 40) if samples else 0.0
            power = energy * 60 if samples else None
            rows.append(
                {
                    "device_id": device,
                    "bucket": m,
                    "household_id": household,
                    "sample_count": samples,
                    "power_w_avg": power,
                    "power_w_min": power,
                    "power_w_max": power,
                    "energy_wh_sum": energy,
                    "rejected_count": 0 if samples else 3,
                }
            )
        m += MINUTE
    return rows


def load_dataset(conn: psycopg.Connection, rows: list[dict]) -> None:
    """Devices, minute rows with their ledger, the 5-minute and hourly rollups, and tariffs."""
    storage.upsert_devices(
        conn,
        pl.DataFrame(
            {
                "device_id": list(DEVICES),
                "household_id": [h for h, _, _ in DEVICES.values()],
                "name": [n for _, n, _ in DEVICES.values()],
                "timezone": [z for _, _, z in DEVICES.values()],
            }
        ),
    )
    computed_at = datetime(2026, 3, 30, 14, tzinfo=UTC)
    frame = pl.DataFrame(rows).with_columns(computed_at=pl.lit(computed_at))
    minutes = sorted({r["bucket"] for r in rows})
    ledger = pl.DataFrame({"bucket": minutes}).with_columns(
        *(pl.lit(0).alias(c) for c in ("points_read", "power_w_points", "energy_wh_points")),
        *(pl.lit(0).alias(c) for c in ("duplicates_dropped", "rejected", "devices")),
        computed_at=pl.lit(computed_at),
    )
    with conn.transaction(), conn.cursor() as cur:
        storage.ensure_partitions(cur, "device_rollup_1m", FIRST, LAST)
        storage.copy_frame(cur, "device_rollup_1m", frame)
        storage.copy_frame(cur, "rollup_minutes", ledger)
    for grain in (HOUSEHOLD_5M, DEVICE_1H):
        replace_windows(conn, grain, FIRST, LAST, computed_at)
    tariffs.apply(conn, tariffs.parse_yaml(TARIFF_YAML))


def local_window(day: date, zone: str) -> tuple[datetime, datetime]:
    tz = ZoneInfo(zone)
    start = datetime.combine(day, time(0), tz).astimezone(UTC)
    end = datetime.combine(day + timedelta(days=1), time(0), tz).astimezone(UTC)
    return start, end


def five(ts: datetime) -> datetime:
    return ts - timedelta(minutes=ts.minute % 5)


def expected_report(rows: list[dict], household: str, day: date) -> dict:
    """The report row of one household and day, in plain Python from the minute rows."""
    zone = ZONES[household]
    start, end = local_window(day, zone)
    mine = [r for r in rows if DEVICES[r["device_id"]][0] == household]
    today = [r for r in mine if start <= r["bucket"] < end]
    energy = sum(r["energy_wh_sum"] for r in today) / 1000
    draw: dict[datetime, float] = defaultdict(float)
    for r in today:
        if r["power_w_avg"] is not None:
            draw[r["bucket"]] += r["power_w_avg"]
    peak_minute = max(draw, key=lambda m: (draw[m], -m.timestamp())) if draw else None
    by_device: dict[str, float] = defaultdict(float)
    for r in today:
        by_device[r["device_id"]] += r["energy_wh_sum"]
    top = sorted(by_device.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    history: dict[date, float] = defaultdict(float)
    h_start = local_window(day - timedelta(days=7), zone)[0]
    for r in mine:
        if h_start <= r["bucket"] < start:
            history[r["bucket"].astimezone(ZoneInfo(zone)).date()] += r["energy_wh_sum"] / 1000
    avg = sum(history.values()) / len(history) if history else None
    price = PRICES[household]
    cost = sum(
        Decimal(r["energy_wh_sum"])
        / 1000
        * price(five(r["bucket"]).astimezone(ZoneInfo(zone)).time())
        for r in today
    )
    all_minutes = {r["bucket"] for r in rows}
    windows_with_samples = {five(r["bucket"]) for r in today if r["sample_count"] > 0}
    covered = sum(
        sum(1 for i in range(5) if w + i * MINUTE in all_minutes) for w in windows_with_samples
    )
    return {
        "timezone": zone,
        "day_start": start,
        "energy_kwh": energy,
        "peak_power_w": draw[peak_minute] if peak_minute else None,
        "peak_at": five(peak_minute) if peak_minute else None,
        "top": [(d, e / 1000, e / 1000 / energy) for d, e in top],
        "trailing_avg_kwh": avg,
        "change_pct": 100 * (energy - avg) / avg if avg else None,
        "cost": cost,
        "currency": CURRENCY[household],
        "minutes_covered": covered,
        "minutes_expected": int((end - start) / MINUTE),
    }


@pytest.fixture(scope="module")
def dataset() -> list[dict]:
    return minute_rows()


@pytest.fixture(scope="module")
def loaded_template(pg_server: LocalPostgres, dataset: list[dict]) -> Iterator[str]:
    """A database holding the dataset, copied for each test (loading takes seconds)."""
    name = f"reports_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(TEMPLATE_DB)
            )
        )
    with storage.connect(pg_server.dsn(name)) as c:
        load_dataset(c, dataset)
    yield name
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def loaded_dsn(pg_server: LocalPostgres, loaded_template: str) -> Iterator[str]:
    """A fresh copy of the loaded dataset, dropped after the test."""
    with database_from(pg_server, loaded_template) as dsn:
        yield dsn


@pytest.fixture
def conn(loaded_dsn: str):
    with storage.connect(loaded_dsn) as c:
        yield c


def assert_matches(got: dict, want: dict) -> None:
    assert got["timezone"] == want["timezone"]
    assert got["day_start"] == want["day_start"]
    assert close(got["energy_kwh"], want["energy_kwh"])
    assert close(got["peak_power_w"], want["peak_power_w"])
    assert got["peak_at"] == want["peak_at"]
    tz = ZoneInfo(want["timezone"])
    assert got["peak_local_time"] == want["peak_at"].astimezone(tz).time().replace(tzinfo=None)
    top = [(d["device_id"], d["energy_kwh"], d["share"]) for d in got["top_devices"]]
    assert [d for d, _, _ in top] == [d for d, _, _ in want["top"]]
    for (_, kwh, share), (_, want_kwh, want_share) in zip(top, want["top"], strict=True):
        assert close(kwh, want_kwh) and close(share, want_share)
    assert close(got["trailing_avg_kwh"], want["trailing_avg_kwh"])
    assert close(got["change_pct"], want["change_pct"])
    assert abs(got["cost"] - want["cost"]) <= Decimal("0.0001")
    assert got["currency"] == want["currency"]
    assert got["minutes_covered"] == want["minutes_covered"]
    assert got["minutes_expected"] == want["minutes_expected"]


@pytest.mark.parametrize("day", [NORMAL_DAY, DST_DAY])
def test_reports_equal_independent_computation(conn, dataset, day):
    got = {r["household_id"]: r for r in compute_reports(conn, day)}
    assert sorted(got) == ["hh-berlin", "hh-kat", "hh-ny"]
    for household, row in got.items():
        assert_matches(row, expected_report(dataset, household, day))


def test_dst_day_gap_and_offset_zone_are_reported_as_such(conn):
    got = {r["household_id"]: r for r in compute_reports(conn, DST_DAY)}
    assert got["hh-berlin"]["minutes_expected"] == 1380
    assert got["hh-ny"]["minutes_expected"] == 1440
    # Three hours without data in Kathmandu's (+05:45) day: at most 1260 minutes covered.
    assert got["hh-kat"]["minutes_covered"] <= 1440 - 180
    assert got["hh-kat"]["day_start"] == datetime(2026, 3, 28, 18, 15, tzinfo=UTC)


def test_fall_back_day_has_1500_minutes(conn):
    (row,) = compute_reports(conn, date(2026, 10, 25), households=["hh-berlin"])
    assert row["minutes_expected"] == 1500
    assert row["energy_kwh"] == 0 and row["minutes_covered"] == 0 and row["peak_at"] is None


def test_rerun_replaces_the_day_exactly(conn):
    first = replace_day(conn, DST_DAY, datetime(2026, 3, 31, tzinfo=UTC))
    before = conn.execute(
        "SELECT * FROM energy.household_daily_report ORDER BY household_id"
    ).fetchall()
    conn.execute(
        "INSERT INTO energy.household_daily_report (household_id, day, timezone, day_start, "
        "day_end, energy_kwh, minutes_covered, minutes_expected, generated_at) VALUES "
        "('hh-gone', %s, 'UTC', now(), now(), 1, 0, 1440, now())",
        (DST_DAY,),
    )
    second = replace_day(conn, DST_DAY, datetime(2026, 3, 31, tzinfo=UTC))
    after = conn.execute(
        "SELECT * FROM energy.household_daily_report ORDER BY household_id"
    ).fetchall()
    assert first == second and first.households == 3
    assert before == after
    (days,) = conn.execute("SELECT count(*) FROM energy.report_days").fetchone()
    assert days == 1


def test_kwh_check_fails_on_a_tampered_five_minute_row(conn):
    replace_day(conn, DST_DAY, datetime(2026, 3, 31, tzinfo=UTC))
    assert all(c.passed for c in kwh_checks(conn, DST_DAY))
    start, _ = local_window(DST_DAY, "Europe/Berlin")
    conn.execute(
        "UPDATE energy.household_rollup_5m SET energy_wh_sum = energy_wh_sum + 1 "
        "WHERE household_id = 'hh-berlin' AND bucket = %s",
        (start + timedelta(hours=5),),
    )
    failed = [c.household_id for c in kwh_checks(conn, DST_DAY) if not c.passed]
    assert failed == ["hh-berlin"]


def test_no_tariff_leaves_cost_unknown_and_band_gap_too(conn):
    conn.execute("UPDATE energy.tariffs SET is_default = false")
    got = {r["household_id"]: r for r in compute_reports(conn, DST_DAY)}
    assert got["hh-kat"]["cost"] is None and got["hh-kat"]["tariff_id"] is None
    assert got["hh-berlin"]["cost"] is not None
    # A band removed behind the file's back: the day's cost becomes unknown, not too low.
    conn.execute(
        "DELETE FROM energy.tariff_bands WHERE tariff_id = 'tou-eur' AND price_per_kwh = 0.34"
    )
    (row,) = compute_reports(conn, DST_DAY, households=["hh-berlin"])
    assert row["cost"] is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "tariffs: [{id: a, currency: EUR, bands: [{start: '00:00', end: '23:00', "
            "price_per_kwh: 1}]}]",
            "end at 23:00",
        ),
        (
            "tariffs: [{id: a, currency: EUR, bands: [{start: '00:00', end: '12:00', "
            "price_per_kwh: 1}, {start: '11:00', end: '24:00', price_per_kwh: 1}]}]",
            "overlap",
        ),
        (
            "tariffs: [{id: a, currency: EUR, bands: [{start: '00:00', end: '12:03', "
            "price_per_kwh: 1}, {start: '12:03', end: '24:00', price_per_kwh: 1}]}]",
            "5-minute",
        ),
        ("tariffs: [{id: a, currency: EURO, bands: []}]", "3-letter"),
        (
            "tariffs: [{id: a, currency: EUR, bands: [{start: '00:00', end: '24:00', "
            "price_per_kwh: -1}]}]",
            ">= 0",
        ),
        (
            "tariffs: [{id: a, currency: EUR, bands: [{start: '00:00', end: '24:00', "
            "price_per_kwh: nan}]}]",
            ">= 0",
        ),
        ("assignments: [{household_id: h, tariff: a, from: yesterday}]", "YYYY-MM-DD"),
        ("- just a list", "mapping"),
    ],
)
def test_tariff_file_errors_are_clear(text, message):
    with pytest.raises(tariffs.TariffError, match=message):
        tariffs.parse_yaml(text)


def test_tariff_apply_is_idempotent_and_checks_names(conn, tmp_path: Path):
    def snapshot():
        return [
            conn.execute(f"SELECT {cols} FROM energy.{t} ORDER BY 1, 2").fetchall()
            for t, cols in (
                ("tariff_bands", "tariff_id, start_time, end_time::text, price_per_kwh"),
                ("household_tariffs", "household_id, valid_from, tariff_id"),
            )
        ] + [
            conn.execute(
                "SELECT tariff_id, currency, is_default FROM energy.tariffs ORDER BY 1"
            ).fetchall()
        ]

    before = snapshot()
    tariffs.apply(conn, tariffs.parse_yaml(TARIFF_YAML))
    assert snapshot() == before
    bands = conn.execute(
        "SELECT start_time::text, end_time::text FROM energy.tariff_bands "
        "WHERE tariff_id = 'tou-eur' ORDER BY start_time"
    ).fetchall()
    assert bands == [("00:00:00", "07:00:00"), ("07:00:00", "22:00:00"), ("22:00:00", "24:00:00")]
    csv_file = tmp_path / "assign.csv"
    csv_file.write_text("household_id,tariff_id,valid_from\nhh-kat,no-such,2026-01-01\n")
    with pytest.raises(tariffs.TariffError, match="unknown tariffs: no-such"):
        tariffs.apply(conn, tariffs.load(csv_file))
    assert snapshot() == before  # nothing of the failed file was written
    bands_csv = tmp_path / "bands.csv"
    bands_csv.write_text(
        "tariff_id,currency,start,end,price_per_kwh,default\n"
        "night,GBP,00:00,06:00,0.1,true\nnight,GBP,06:00,24:00,0.2,\n"
    )
    tariffs.apply(conn, tariffs.load(bands_csv))
    defaults = conn.execute("SELECT tariff_id FROM energy.tariffs WHERE is_default").fetchall()
    assert defaults == [("night",)]


# --- Dagster: the asset, its check, the sensor -------------------------------------------------


def materialize_day(dsn: str, out_dir: Path, day: date) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [household_daily_report, kwh_matches_five_minute_rows],
        resources={
            "postgres": PostgresResource(dsn=dsn),
            "report_output": ReportOutputResource(reports_dir=str(out_dir)),
        },
        partition_key=day.isoformat(),
        raise_on_error=False,
    )


def test_a_ranged_run_records_each_days_own_figures(loaded_dsn: str, tmp_path: Path):
    result = dg.materialize(
        [household_daily_report],
        resources={
            "postgres": PostgresResource(dsn=loaded_dsn),
            "report_output": ReportOutputResource(reports_dir=str(tmp_path)),
        },
        tags={
            "dagster/asset_partition_range_start": NORMAL_DAY.isoformat(),
            "dagster/asset_partition_range_end": DST_DAY.isoformat(),
        },
    )
    assert result.success
    got = {
        e.partition: (
            e.materialization.metadata["total_kwh"].value,
            e.materialization.metadata["fleet_overview"].value,
        )
        for e in result.get_asset_materialization_events()
    }
    with storage.connect(loaded_dsn) as conn:
        kwh = dict(
            conn.execute(
                "SELECT day, round(sum(energy_kwh)::numeric, 3)::float8 "
                "FROM energy.household_daily_report GROUP BY day"
            ).fetchall()
        )
    days = [NORMAL_DAY + timedelta(days=i) for i in range(3)]
    assert got == {
        d.isoformat(): (pytest.approx(kwh[d], abs=0.002), str(tmp_path / "fleet" / f"{d}.html"))
        for d in days
    }
    assert len({kwh[d] for d in days}) == 3  # the days differ: no run total repeated


def run_check_only(dsn: str, day: date) -> dg.AssetCheckEvaluation:
    job = dg.define_asset_job(
        "report_check_only",
        selection=dg.AssetSelection.checks_for_assets(household_daily_report),
        partitions_def=DAILY_REPORT_PARTITIONS,
    )
    defs = dg.Definitions(
        assets=[household_daily_report],
        asset_checks=[kwh_matches_five_minute_rows],
        jobs=[job],
        resources={
            "postgres": PostgresResource(dsn=dsn),
            "report_output": ReportOutputResource(reports_dir="/nonexistent"),
        },
    )
    result = defs.resolve_job_def(job.name).execute_in_process(
        tags={"dagster/partition": day.isoformat()}, raise_on_error=False
    )
    (evaluation,) = result.get_asset_check_evaluations()
    return evaluation


def test_asset_writes_rows_and_fleet_page_and_its_check_catches_tampering(
    loaded_dsn: str, tmp_path: Path
):
    result = materialize_day(loaded_dsn, tmp_path, DST_DAY)
    assert result.success
    (mat,) = result.get_asset_materialization_events()
    meta = mat.materialization.metadata
    page = tmp_path / "fleet" / "2026-03-29.html"
    assert meta["fleet_overview"].value == str(page) and page.exists()
    assert meta["households"].value == 3 and meta["households_with_data"].value == 3
    assert "kWh" in meta["summary"].value
    html_text = page.read_text()
    assert "<script" not in html_text.lower().replace("<script>", "")
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.passed and evaluation.partition == "2026-03-29"
    with psycopg.connect(loaded_dsn) as conn:
        stored = conn.execute(
            "SELECT household_id, energy_kwh FROM energy.household_daily_report WHERE day = %s",
            (DST_DAY,),
        ).fetchall()
        assert len(stored) == 3
        conn.execute(
            "UPDATE energy.household_rollup_5m SET energy_wh_sum = energy_wh_sum * 2 "
            "WHERE household_id = 'hh-ny' AND bucket = (SELECT min(bucket) "
            "FROM energy.household_rollup_5m WHERE household_id = 'hh-ny' AND bucket >= %s)",
            (datetime(2026, 3, 29, 17, tzinfo=UTC),),
        )
    failed = run_check_only(loaded_dsn, DST_DAY)
    assert not failed.passed and failed.metadata["mismatched"].value == 1
    assert "hh-ny" in failed.metadata["first_mismatches"].value


def test_zone_rule_is_reported_in_metadata(loaded_dsn: str, tmp_path: Path):
    with storage.connect(loaded_dsn) as conn:
        storage.upsert_devices(
            conn,
            pl.DataFrame(
                {"device_id": ["k3"], "household_id": ["hh-kat"], "timezone": ["Asia/Dhaka"]}
            ),
        )
    result = materialize_day(loaded_dsn, tmp_path, DST_DAY)
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    assert meta["households_with_mixed_zones"].value == 1
    assert "hh\\-kat" in meta["zone_rule"].value
    with psycopg.connect(loaded_dsn) as conn:
        (zone,) = conn.execute(
            "SELECT timezone FROM energy.household_daily_report "
            "WHERE household_id = 'hh-kat' AND day = %s",
            (DST_DAY,),
        ).fetchone()
    assert zone == "Asia/Kathmandu"  # two devices against one


def test_sensor_requests_due_days_then_only_recomputed_ones(
    loaded_dsn: str, tmp_path: Path, monkeypatch
):
    monkeypatch.setattr(
        "energy_pipeline.defs.reports.sensors.utcnow",
        lambda: datetime(2026, 3, 31, 12, 10, tzinfo=UTC),
    )
    sensor = build_report_sensor(settle_seconds=1800)
    instance = dg.DagsterInstance.ephemeral()
    resources = {"postgres": PostgresResource(dsn=loaded_dsn)}

    def tick() -> list[dg.RunRequest]:
        result = sensor(dg.build_sensor_context(instance=instance, resources=resources))
        assert isinstance(result, dg.SensorResult)
        return list(result.run_requests or [])

    # 2026-03-30 closes everywhere at 03-31 12:00 and settles until 12:30: not yet due.
    first = tick()
    assert [r.partition_key for r in first][:2] == ["2026-03-29", "2026-03-28"]
    assert len(first) == 7
    materialize_day(loaded_dsn, tmp_path, DST_DAY)
    # A run of the 28th that fails (its page cannot be written) holds that day back for the
    # retry backoff: the sensor reads its own failed runs from the instance.
    failed = dg.materialize(
        [household_daily_report],
        resources={
            "postgres": PostgresResource(dsn=loaded_dsn),
            "report_output": ReportOutputResource(reports_dir="/dev/null/reports"),
        },
        partition_key="2026-03-28",
        tags={ORIGIN_TAG: ORIGIN},
        instance=instance,
        raise_on_error=False,
    )
    assert not failed.success
    with psycopg.connect(loaded_dsn) as conn:
        assert conn.execute(
            "SELECT count(*) FROM energy.report_days WHERE day = '2026-03-28'"
        ).fetchone() == (0,)
    pending = [r.partition_key for r in tick()]
    assert "2026-03-29" not in pending and "2026-03-28" not in pending
    assert "2026-03-27" in pending
    # A late minute recomputes a 5-minute window of the 29th: that day (and the days whose
    # trailing week holds it) are requested again, under a new run key.
    with storage.connect(loaded_dsn) as conn:
        window = datetime(2026, 3, 29, 10, tzinfo=UTC)
        replace_windows(
            conn, HOUSEHOLD_5M, window, window + timedelta(minutes=5), datetime.now(UTC)
        )
    again = {r.partition_key: r.run_key for r in tick()}
    assert "2026-03-29" in again
    assert again["2026-03-29"] != next(r.run_key for r in first if r.partition_key == "2026-03-29")


def recompute_window(conn: psycopg.Connection, start: datetime) -> None:
    """Roll one 5-minute window up again now, as late data would."""
    replace_windows(conn, HOUSEHOLD_5M, start, start + timedelta(minutes=5), datetime.now(UTC))


def is_stale(conn: psycopg.Connection, day: date) -> bool:
    (s,) = report_day_states(conn, day, day)
    return s.stale


def test_live_windows_after_the_last_zone_closes_do_not_make_a_day_stale(conn):
    # Day D is due at D+1 12:30 and reads nothing after D+1 12:00 UTC (UTC-12's midnight):
    # the 5-minute windows rolled up from then on must not re-request it.
    replace_day(conn, DST_DAY, datetime(2026, 3, 31, tzinfo=UTC))
    assert not is_stale(conn, DST_DAY)
    closed = datetime(2026, 3, 30, 12, tzinfo=UTC)
    for start in (closed, closed + timedelta(minutes=30), closed + timedelta(minutes=55)):
        recompute_window(conn, start)
        assert not is_stale(conn, DST_DAY), start
    # Before the span too: UTC+14's trailing week starts at D-8 10:00 UTC.
    recompute_window(conn, datetime(2026, 3, 21, 9, 55, tzinfo=UTC))
    assert not is_stale(conn, DST_DAY)


@pytest.mark.parametrize(
    "window",
    [
        datetime(2026, 3, 29, 10, tzinfo=UTC),  # inside every zone's day
        datetime(2026, 3, 30, 11, 55, tzinfo=UTC),  # UTC-12's last window of D
        datetime(2026, 3, 28, 10, tzinfo=UTC),  # UTC+14's first window of D
        datetime(2026, 3, 21, 10, tzinfo=UTC),  # UTC+14's first window of the trailing week
    ],
)
def test_a_changed_window_the_day_reads_makes_it_stale(conn, window):
    replace_day(conn, DST_DAY, datetime(2026, 3, 31, tzinfo=UTC))
    recompute_window(conn, window)
    assert is_stale(conn, DST_DAY)
    replace_day(conn, DST_DAY, datetime(2026, 3, 31, 1, tzinfo=UTC))
    assert not is_stale(conn, DST_DAY)


@pytest.mark.parametrize("day", [DST_DAY, date(2026, 10, 25), date(2026, 7, 1)])
def test_day_span_holds_every_postgres_zone_day_exactly(conn, day):
    # The span the stamp covers is the union of day D over every zone PostgreSQL knows.
    first, last = conn.execute(
        "SELECT min(%(d)s::date::timestamp AT TIME ZONE name), "
        "max((%(d)s::date + 1)::timestamp AT TIME ZONE name) FROM pg_timezone_names",
        {"d": day},
    ).fetchone()
    assert (first, last) == day_span(day)


# --- The planner (pure) ------------------------------------------------------------------------

T0 = datetime(2026, 3, 1, tzinfo=UTC)
SETTLE = timedelta(minutes=30)


def state(day: int, stamp_s: int | None = 0, recorded_s: int | None = None) -> ReportDayState:
    return ReportDayState(
        date(2026, 3, day),
        None if stamp_s is None else T0 + timedelta(seconds=stamp_s),
        recorded_s is not None,
        None if recorded_s is None else T0 + timedelta(seconds=recorded_s),
    )


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (datetime(2026, 3, 11, 12, 29, tzinfo=UTC), []),  # UTC-12's day 10 still settling
        (datetime(2026, 3, 11, 12, 30, tzinfo=UTC), [date(2026, 3, 10)]),
    ],
)
def test_plan_waits_for_the_last_zone_and_settle(now, expected):
    assert [r.day for r in plan_report_days([state(10)], [], [], now, SETTLE)] == expected


def test_plan_skips_current_inflight_and_empty_days_and_goes_newest_first():
    now = datetime(2026, 3, 20, tzinfo=UTC)
    states = [state(3), state(4, 5, recorded_s=5), state(5, None), state(6), state(7, 9, 8)]
    in_flight = [DayRun(date(2026, 3, 6), now)]
    plan = plan_report_days(states, in_flight, [], now, SETTLE)
    assert [r.day.day for r in plan] == [7, 3]


def test_plan_run_keys_follow_the_source_stamp():
    now = datetime(2026, 3, 20, tzinfo=UTC)
    (a,) = plan_report_days([state(3, 10)], [], [], now, SETTLE)
    (b,) = plan_report_days([state(3, 10)], [], [], now, SETTLE)
    (c,) = plan_report_days([state(3, 11)], [], [], now, SETTLE)
    assert a.run_key == b.run_key != c.run_key


def test_plan_retries_a_failed_day_after_the_backoff_under_a_new_key():
    now = datetime(2026, 3, 20, tzinfo=UTC)
    (first,) = plan_report_days([state(3)], [], [], now, SETTLE)
    failed = [DayRun(date(2026, 3, 3), T0, ended=now - timedelta(minutes=1))]
    assert plan_report_days([state(3)], [], failed, now, SETTLE) == []
    (retry,) = plan_report_days([state(3)], [], failed, now + timedelta(minutes=5), SETTLE)
    assert retry.run_key != first.run_key and ":retry-" in retry.run_key


def test_plan_limits_requests_per_tick():
    now = datetime(2026, 3, 28, tzinfo=UTC)
    plan = plan_report_days([state(d) for d in range(1, 21)], [], [], now, SETTLE)
    assert [r.day.day for r in plan] == [20, 19, 18, 17, 16, 15, 14]


def test_page_of_a_zone_python_does_not_know_falls_back_to_utc(conn, monkeypatch):
    # PostgreSQL and Python read separate tz databases: one may know a zone the other lacks.
    # Python's lookup is made to lack Kathmandu; the report itself is computed by PostgreSQL.
    real = pages.ZoneInfo

    def lacks_kathmandu(key: str) -> ZoneInfo:
        if key == "Asia/Kathmandu":
            raise ZoneInfoNotFoundError(key)
        return real(key)

    monkeypatch.setattr(pages, "ZoneInfo", lacks_kathmandu)
    page = pages.household_page(conn, "hh-kat", DST_DAY)
    assert page is not None and page.report["timezone"] == "Asia/Kathmandu"
    assert page.clock_note and "Asia/Kathmandu" in page.clock_note and "UTC" in page.clock_note
    # The day starts at 18:15 UTC (+05:45): the hour labels are UTC clock times.
    assert [h.label for h in page.hours[:2]] == ["18:15", "19:15"]
    assert len(page.hours) == 24
    assert "hours are shown in UTC" in household_html(page)
    assert pages.household_page(conn, "hh-berlin", DST_DAY).clock_note is None  # type: ignore[union-attr]


def test_page_zone_names_the_fallback():
    assert pages.page_zone("Europe/Berlin") == ("Europe/Berlin", None)
    zone, note = pages.page_zone("Mars/Olympus_Mons")
    assert zone == "UTC" and note and "Mars/Olympus_Mons" in note


# --- Run-state helpers shared with the hierarchy sensor ---------------------------------------


def test_report_and_hierarchy_sensors_share_one_run_state_module():
    from energy_pipeline.defs import runs
    from energy_pipeline.defs.hierarchy import sensors as hierarchy_sensors
    from energy_pipeline.defs.reports import sensors as report_sensors

    for module in (hierarchy_sensors, report_sensors):
        assert module.ORIGIN_TAG is runs.ORIGIN_TAG
        assert module.IN_FLIGHT is runs.IN_FLIGHT and module.FAILED is runs.FAILED
        assert module.run_time is runs.run_time
    at = datetime(2026, 3, 29, 12, 30, tzinfo=UTC)
    assert runs.run_time(at.timestamp()) == at
    assert runs.run_time(at.replace(tzinfo=None)) == at  # naive means UTC
    assert runs.run_time(at) == at and runs.run_time(None) is None
    assert dg.DagsterRunStatus.STARTED in runs.IN_FLIGHT
    assert dg.DagsterRunStatus.CANCELED in runs.FAILED


# --- Command line ------------------------------------------------------------------------------


def test_cli_renders_a_household_report_and_applies_tariffs(
    loaded_dsn: str, tmp_path: Path, monkeypatch, capsys
):
    monkeypatch.setenv("ENERGY_PG_DSN", loaded_dsn)
    out = tmp_path / "berlin.html"
    assert (
        cli.main(["report", "--household", "hh-berlin", "--date", "2026-03-29", "--out", str(out)])
        == 0
    )
    assert "computed now, not stored" in capsys.readouterr().out
    page = out.read_text()
    assert page.count('class="pt"') == 23 and "&lt;script&gt;" in page
    assert cli.main(["report", "--household", "nobody", "--date", "2026-03-29"]) == 2
    assert "no registered device" in capsys.readouterr().err
    assert cli.main(["report", "--household", "hh-ny", "--date", "29.03.2026"]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("tariffs: [{id: x, currency: EUR, bands: []}]")
    assert cli.main(["tariffs", "apply", str(bad)]) == 2
    assert "bands must be a non-empty list" in capsys.readouterr().err
    example = Path(__file__).resolve().parent.parent / "examples" / "tariffs.yaml"
    assert cli.main(["tariffs", "apply", str(example)]) == 0
    assert "applied" in capsys.readouterr().out


def test_a_zone_postgres_does_not_know_is_reported_in_utc_and_noted(conn):
    # The registry refuses such zones; a row edited by hand can still hold one.
    conn.execute(
        "INSERT INTO energy.devices (device_id, household_id, timezone) "
        "VALUES ('m1', 'hh-mars', 'Mars/Olympus_Mons')"
    )
    (row,) = compute_reports(conn, DST_DAY, households=["hh-mars"])
    assert row["timezone"] == "UTC" and row["minutes_expected"] == 1440
    assert row["energy_kwh"] == 0 and row["minutes_covered"] == 0
    notes = {n.household_id: n for n in zone_notes(conn)}
    assert notes["hh-mars"].unknown_zone and notes["hh-mars"].zones == ["Mars/Olympus_Mons"]
