"""Fault injection on the minute path: server limits, type drift, poison points, corrected values.

Every test runs against real InfluxDB servers, some configured with the `[coordinator]` limits
production servers use (`max-select-point`, `max-concurrent-queries`, `query-timeout`), and a real
PostgreSQL. Each one reproduces a way the pipeline once stored less than InfluxDB held, or
stored it without saying so.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import polars as pl
import psycopg
import pytest
import requests

from energy_pipeline import storage
from energy_pipeline.definitions import build_definitions
from energy_pipeline.defs.minute_rollups import sensors
from energy_pipeline.devtools.lineprotocol import encode_points
from energy_pipeline.devtools.services import LocalInflux, free_port
from energy_pipeline.devtools.simulator import build_fleet, generate_points
from energy_pipeline.influx import InfluxClient, InfluxLimitError, query_results, to_ns
from energy_pipeline.sources import (
    COUNTED,
    MINUTE,
    current_checksums,
    current_counts,
    late_minutes,
)
from energy_pipeline_tests.helpers import base_minute, fetch_quarantine, materialize_minutes

NS = 1_000_000_000


def _server(
    root: Path, http: dict[str, int | str] | None = None, **limits: int | str
) -> Iterator[LocalInflux]:
    server = LocalInflux(root, free_port(), coordinator=dict(limits), http=http or {})
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def point_limited(tmp_path_factory) -> Iterator[LocalInflux]:
    """A server that stops any query still running at its 1 s check past 100,000 points."""
    yield from _server(tmp_path_factory.mktemp("influx-points"), **{"max-select-point": 100_000})


@pytest.fixture(scope="module")
def query_limited(tmp_path_factory) -> Iterator[LocalInflux]:
    """A server that runs one query at a time and turns the others away."""
    yield from _server(tmp_path_factory.mktemp("influx-queries"), **{"max-concurrent-queries": 1})


@pytest.fixture(scope="module")
def timed_out(tmp_path_factory) -> Iterator[LocalInflux]:
    """A server whose query timeout a minute of 2,000 devices does not fit in."""
    yield from _server(tmp_path_factory.mktemp("influx-timeout"), **{"query-timeout": "5ms"})


@pytest.fixture(scope="module")
def row_limited(tmp_path_factory) -> Iterator[LocalInflux]:
    """A server that cuts every JSON answer not chunked at 100 rows (`[http] max-row-limit`)."""
    yield from _server(tmp_path_factory.mktemp("influx-rows"), http={"max-row-limit": 100})


def _on(server: LocalInflux, settings, shard_hours: int | None = None):
    """A fresh database on `server` and settings pointing at it."""
    client = InfluxClient(server.url, f"f_{uuid.uuid4().hex[:10]}")
    shards = f" WITH SHARD DURATION {shard_hours}h" if shard_hours else ""
    for attempt in range(50):  # even CREATE DATABASE can miss a tiny query timeout
        try:
            client.query_json(f'CREATE DATABASE "{client.database}"{shards}')
            break
        except InfluxLimitError:
            if attempt == 49:
                raise
    return client, replace(settings, influx_url=server.url, influx_database=client.database)


def _fleet(settings, devices: int) -> pl.DataFrame:
    fleet = build_fleet(devices, seed=3, devices_per_household=4)
    with psycopg.connect(settings.pg_dsn) as conn:
        storage.upsert_devices(conn, fleet)
    return fleet


def _write_fleet(client: InfluxClient, fleet: pl.DataFrame, first: datetime, minutes: int) -> int:
    points = generate_points(fleet, to_ns(first), 60 * minutes, seed=3)
    for offset in range(0, points.height, 100_000):
        client.write_lines(encode_points(points.slice(offset, 100_000)))
    return points.height


def _stored(dsn: str) -> tuple[int, int]:
    """(sum of sample_count, rollup rows) in the minute table."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(sample_count), 0), count(*) FROM energy.device_rollup_1m"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _ledger(dsn: str) -> list[dict]:
    with psycopg.connect(dsn, row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute("SELECT * FROM energy.rollup_minutes ORDER BY bucket").fetchall()


def _meta(result: dg.ExecuteInProcessResult) -> dict:
    event = result.get_asset_materialization_events()[0]
    return {k: v.value for k, v in event.materialization.metadata.items()}


# 1. A chunked CSV answer cut short by max-select-point looks complete.
def test_answer_cut_short_by_max_select_point_is_read_again_in_pieces(settings, point_limited):
    client, settings = _on(point_limited, replace(settings, chunk_minutes=10, read_parallelism=1))
    fleet = _fleet(settings, 2000)
    first = base_minute(30)
    written = _write_fleet(client, fleet, first, 10)

    result = materialize_minutes(settings, first, first + timedelta(minutes=9))

    assert _stored(settings.pg_dsn) == (written, 2000 * 10)
    # One query of ten minutes would have been enough had the server not stopped it.
    assert _meta(result)["run_queries"] > 1
    assert sum(r["power_w_points"] for r in _ledger(settings.pg_dsn)) == written


# 1. A limit that even one minute cannot fit fails the run loudly and stores nothing.
def test_query_timeout_on_every_answer_fails_the_run_and_stores_nothing(settings, timed_out):
    client, settings = _on(timed_out, settings)
    fleet = _fleet(settings, 2000)
    first = base_minute(30)
    _write_fleet(client, fleet, first, 1)

    result = materialize_minutes(
        settings, first, first + timedelta(minutes=1), raise_on_error=False
    )

    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.error
    assert failure is not None and failure.cause is not None
    assert "query-timeout" in failure.cause.message
    assert _stored(settings.pg_dsn) == (0, 0)
    assert _ledger(settings.pg_dsn) == []


# 1. Under [http] max-row-limit a JSON answer ended at 100 rows, said so only by "partial".
def test_answers_past_max_row_limit_are_read_whole(settings, row_limited):
    client, settings = _on(row_limited, settings)
    fleet = _fleet(settings, 30)
    first = base_minute(30)
    written = _write_fleet(client, fleet, first, 2)
    device, household = fleet.row(0)[:2]
    # A text value makes its minute one read as JSON: 1,800 rows.
    client.write_lines(
        [f'telemetry,device_id={device},household_id={household} device_id="x",power_w=1.0,'
         f"energy_wh=0.1 {to_ns(first) + 500 * 10**6}"]
    )  # fmt: skip

    materialize_minutes(settings, first, first + timedelta(minutes=1))

    assert _stored(settings.pg_dsn) == (written, 60)
    counts = current_counts(client, "telemetry", first - timedelta(minutes=178), first + 2 * MINUTE)
    assert counts.height == 180 and counts["power_w_points"].sum() == written + 1
    # Another client's answer, not chunked, is still cut: "partial" is a limit, not the rows.
    q = 'SELECT count("power_w") FROM "telemetry" WHERE time > now() - 3h GROUP BY time(1m)'
    body = requests.post(
        f"{row_limited.url}/query", data={"db": client.database, "q": q}, timeout=10
    ).text
    with pytest.raises(InfluxLimitError, match="max-row-limit"):
        query_results(body)


# 2. Under max-concurrent-queries a slice's CSV came back empty and was taken as "no points".
def test_slices_turned_away_by_max_concurrent_queries_are_asked_again(settings, query_limited):
    client, settings = _on(query_limited, replace(settings, read_parallelism=8))
    fleet = _fleet(settings, 1000)
    first = base_minute(30)
    written = _write_fleet(client, fleet, first, 2)

    for _ in range(3):  # every run must see all of it, however the slices collide
        materialize_minutes(settings, first, first + timedelta(minutes=1))
        assert _stored(settings.pg_dsn) == (written, 2000)


# 3. A *field* named like a tag used to hide every point of its shard from the tag filter.
@pytest.mark.parametrize("tag", ["device_id", "household_id"])
def test_field_named_like_a_tag_is_quarantined_and_hides_nothing(settings, influx_db, tag):
    settings = replace(settings, read_parallelism=2)
    fleet = _fleet(settings, 20)
    first = base_minute(30)
    written = _write_fleet(influx_db, fleet, first, 1)
    device, household = fleet.row(0)[:2]
    t = to_ns(first) + 500 * 10**6  # between the simulated points
    influx_db.write_lines(
        [f'telemetry,device_id={device},household_id={household} {tag}="x",power_w=1.0,'
         f"energy_wh=0.1 {t}"]
    )  # fmt: skip

    materialize_minutes(settings, first, first)

    assert _stored(settings.pg_dsn) == (written, 20)
    assert [(r[1], r[-1]) for r in fetch_quarantine(settings.pg_dsn)] == [
        (t, f"{tag}: also written as a field")
    ]


def _late_requests(settings, instance: dg.DagsterInstance) -> list[dg.RunRequest]:
    defs = build_definitions(settings)
    sensor = defs.get_repository_def().get_sensor_def("late_data_sensor")
    context = dg.build_sensor_context(instance=instance, resources=defs.resources, definitions=defs)
    return list(sensor.evaluate_tick(context).run_requests or [])


@pytest.fixture
def clock(monkeypatch):
    now = base_minute(0) + timedelta(seconds=30)
    monkeypatch.setattr(sensors, "utcnow", lambda: now)
    return now


# 4. A point re-written with a corrected value changes no count.
def test_corrected_value_gets_its_minute_recomputed(settings, influx_db, clock):
    fleet = _fleet(settings, 5)
    first = base_minute(10)
    _write_fleet(influx_db, fleet, first, 1)
    materialize_minutes(settings, first, first)
    instance = dg.DagsterInstance.ephemeral()
    assert _late_requests(settings, instance) == []

    device, household = fleet.row(0)[:2]
    influx_db.write_lines(
        [f"telemetry,device_id={device},household_id={household} power_w=4321.5 {to_ns(first)}"]
    )

    requests = _late_requests(settings, instance)
    assert [r.partition_key for r in requests] == [first.strftime("%Y-%m-%d-%H:%M")]
    materialize_minutes(settings, first, first)
    assert _late_requests(settings, instance) == []


# 4. A sum past the float range: InfluxDB 1.x cannot encode it and answers with text, not JSON.
def test_minute_whose_sum_overflows_keeps_the_late_data_check_going(settings, influx_db, clock):
    fleet = _fleet(settings, 2)
    first = base_minute(10)
    _write_fleet(influx_db, fleet, first, 3)
    device, household = fleet.row(0)[:2]
    tags = f"telemetry,device_id={device},household_id={household}"
    huge = first + MINUTE
    influx_db.write_lines(
        [
            f"{tags} power_w=1.7e308,energy_wh=1.7e308 {to_ns(huge) + i * NS + 10**8}"
            for i in range(3)
        ]
    )
    materialize_minutes(settings, first, first + 2 * MINUTE)
    assert _ledger(settings.pg_dsn)[1]["power_w_sum"] == float("inf")  # the client's sum

    # Only that minute's sums are unknown; unknown is no evidence of a change.
    now = current_checksums(influx_db, "telemetry", first, first + 3 * MINUTE)
    assert now["power_w_sum"].is_null().to_list() == [False, True, False]
    assert _late_requests(settings, dg.DagsterInstance.ephemeral()) == []

    # Its counts still see a late point, and the other minutes' sums a corrected value.
    influx_db.write_lines(
        [f"{tags} power_w=1.0,energy_wh=0.1 {to_ns(huge) + 5 * 10**8}",
         f"{tags} power_w=4321.5 {to_ns(first)}"]
    )  # fmt: skip
    with psycopg.connect(settings.pg_dsn) as conn:
        stored = storage.ledger_between(conn, first, first + 3 * MINUTE)
    now = current_checksums(influx_db, "telemetry", first, first + 3 * MINUTE)
    assert late_minutes(now, stored)["bucket"].to_list() == [first, huge]


def test_a_device_overflowing_every_minute_costs_a_bounded_number_of_queries(influx_db):
    class Counting(InfluxClient):
        queries = 0

        def query_json(self, q, params=None):
            if q.startswith("SELECT count("):
                Counting.queries += 1
            return super().query_json(q, params)

    first = base_minute(60)
    influx_db.write_lines(
        [f"telemetry,device_id=d1,household_id=h1 power_w={v},energy_wh=0.1 "
         f"{to_ns(first) + m * 60 * NS + i * NS}"
         for m in range(48) for i, v in enumerate(("1.7e308", "1.7e308", "5"))]
    )  # fmt: skip
    client = Counting(influx_db.url, influx_db.database)
    now = current_checksums(client, "telemetry", first, first + 48 * MINUTE)
    # Halved 4 times at most (1 + 2 + 4 + 8 + 16 queries), then counts alone for 16 pieces;
    # a query per minute would be over a hundred.
    assert Counting.queries <= 31 + 16
    assert now["power_w_points"].to_list() == [3] * 48
    assert now["power_w_sum"].is_null().all()


# 4. InfluxDB sums an integer field as integers, which wrap around past 2**63.
def test_integer_sums_past_int64_match_the_clients(settings, influx_db, clock):
    fleet = _fleet(settings, 1)
    device, household = fleet.row(0)[:2]
    first = base_minute(10)
    influx_db.write_lines(
        [f"telemetry,device_id={device},household_id={household} power_w=9000000000000000000i,"
         f"energy_wh=1i {to_ns(first) + i * NS}" for i in range(2)]
    )  # fmt: skip
    materialize_minutes(settings, first, first)

    now = current_checksums(influx_db, "telemetry", first, first + MINUTE)
    assert now["power_w_sum"].to_list() == [1.8e19]
    assert _ledger(settings.pg_dsn)[0]["power_w_sum"] == 1.8e19
    instance = dg.DagsterInstance.ephemeral()
    for _ in range(2):
        assert _late_requests(settings, instance) == []


# 5. Field-type drift across shards: strings where numbers were, and the empty string.
def test_field_type_drift_across_shards_is_quarantined_exactly_and_checked_stably(
    settings, influx_server, clock
):
    client, settings = _on(influx_server, settings, shard_hours=1)
    fleet = _fleet(settings, 3)
    device, household = fleet.row(0)[:2]
    # The last minute of one shard holds numbers, the first minute of the next holds text.
    boundary = clock.replace(minute=0, second=0) - timedelta(hours=1)
    before, after = boundary - timedelta(minutes=1), boundary
    _write_fleet(client, fleet, before, 1)
    tags = f"telemetry,device_id={device},household_id={household}"
    t = to_ns(after)
    client.write_lines(
        [
            f'{tags} power_w="",energy_wh=0.5 {t}',
            f'{tags} power_w="NaN",energy_wh=0.5 {t + NS}',
            f'{tags} power_w="12.5",energy_wh=0.5 {t + 2 * NS}',
        ]
    )
    materialize_minutes(settings, before, after)

    reasons = [(r[1], r[-1]) for r in fetch_quarantine(settings.pg_dsn)]
    assert reasons == [
        (t, "power_w: not a number (string '')"),
        (t + NS, "power_w: not a number (string 'NaN')"),
        (t + 2 * NS, "power_w: not a number (string '12.5')"),
    ]
    ledger = {r["bucket"]: r for r in _ledger(settings.pg_dsn)}
    assert ledger[after]["power_w_points"] == 3
    # A check spanning both shards sees what the rollups saw: nothing late, on every tick.
    with psycopg.connect(settings.pg_dsn) as conn:
        stored = storage.ledger_between(conn, before, after + timedelta(minutes=1))
    now = current_checksums(client, "telemetry", before, after + timedelta(minutes=1))
    assert late_minutes(now, stored).is_empty()
    instance = dg.DagsterInstance.ephemeral()
    for _ in range(2):
        assert _late_requests(settings, instance) == []
    with psycopg.connect(settings.pg_dsn) as conn:
        ignored = conn.execute("SELECT sum(late_points_ignored) FROM energy.rollup_minutes")
        assert ignored.fetchone() == (0,)


# 6. voltage_v: rolled up, out-of-range values quarantined, voltage-only points counted.
def test_voltage_is_rolled_up_and_no_voltage_point_disappears(settings, influx_db):
    fleet = _fleet(settings, 1)
    device, household = fleet.row(0)[:2]
    first = base_minute(30)
    t = to_ns(first)
    tags = f"telemetry,device_id={device},household_id={household}"
    influx_db.write_lines(
        [
            f"{tags} power_w=100.0,energy_wh=0.1,voltage_v=229.0 {t}",
            f"{tags} power_w=100.0,energy_wh=0.1,voltage_v=231.0 {t + NS}",
            f"{tags} power_w=100.0,energy_wh=0.1 {t + 2 * NS}",
            f"{tags} power_w=100.0,energy_wh=0.1,voltage_v=900.0 {t + 3 * NS}",
            f"{tags} voltage_v=230.0 {t + 4 * NS}",
        ]
    )
    materialize_minutes(settings, first, first)

    with psycopg.connect(settings.pg_dsn) as conn:
        row = conn.execute(
            "SELECT sample_count, rejected_count, voltage_v_avg, voltage_v_min, voltage_v_max "
            "FROM energy.device_rollup_1m"
        ).fetchall()
    assert row == [(3, 2, 230.0, 229.0, 231.0)]
    reasons = [(r[1], r[-1]) for r in fetch_quarantine(settings.pg_dsn)]
    assert reasons[0][0] == t + 3 * NS and reasons[0][1].startswith("voltage_v: in_range")
    assert reasons[1] == (t + 4 * NS, "energy_wh: missing; power_w: missing")


# 7. Tags InfluxDB accepts but Polars and PostgreSQL do not must not block good minutes.
def test_poison_tags_are_quarantined_and_good_minutes_are_written(settings, influx_db):
    fleet = _fleet(settings, 4)
    first = base_minute(30)
    written = _write_fleet(influx_db, fleet, first, 3)
    device, household = fleet.row(0)[:2]
    t = to_ns(first + timedelta(minutes=1)) + 250 * 10**6
    influx_db.write_lines(
        b"telemetry,device_id=bad\xff\xfeid,household_id=h1 power_w=1.0,energy_wh=0.1 %d\n"
        b"telemetry,device_id=nul\x00id,household_id=h1 power_w=1.0,energy_wh=0.1 %d\n"
        b"telemetry,device_id=%s,household_id=h\x00x power_w=1.0,energy_wh=0.1 %d"
        % (t, t + 1, device.encode(), t + 2)
    )

    materialize_minutes(settings, first, first + timedelta(minutes=2))

    assert _stored(settings.pg_dsn) == (written, 12)
    quarantined = {(r[1], r[2], r[3], r[-1]) for r in fetch_quarantine(settings.pg_dsn)}
    assert quarantined == {
        (t, "bad\ufffd\ufffdid", "h1", "device_id: invalid UTF-8"),
        (t + 1, "nul\\x00id", "h1", "device_id: contains NUL"),
        (t + 2, device, "h\\x00x", "household_id: contains NUL"),
    }
    with psycopg.connect(settings.pg_dsn) as conn:
        rejected = conn.execute(
            "SELECT device_id, household_id, rejected_count FROM energy.device_rollup_1m "
            "WHERE rejected_count > 0"
        ).fetchall()
    assert rejected == [(device, household, 1)]


# 14. Points no minute partition will ever read are counted where an operator looks.
def test_points_dated_outside_every_partition_are_counted(settings, influx_db, clock):
    fleet = _fleet(settings, 1)
    device, household = fleet.row(0)[:2]
    tags = f"telemetry,device_id={device},household_id={household}"
    far_future = to_ns(datetime(2200, 1, 1, tzinfo=UTC))
    influx_db.write_lines(
        [
            f"{tags} power_w=1.0,energy_wh=0.1 {far_future}",
            f"{tags} power_w=1.0,energy_wh=0.1 {far_future + NS}",
            f"{tags} power_w=1.0 {-86_400 * NS}",  # 1969-12-31
        ]
    )
    _late_requests(settings, dg.DagsterInstance.ephemeral())

    with psycopg.connect(settings.pg_dsn) as conn:
        rows = conn.execute(
            "SELECT side, points FROM energy.raw_out_of_range ORDER BY side"
        ).fetchall()
    assert rows == [("after", 4), ("before", 1)]


def test_recent_ticks_compare_counts_and_full_scans_compare_checksums():
    bucket = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
    ledger = pl.DataFrame(
        {
            "bucket": [bucket, bucket + timedelta(minutes=1)],
            "power_w_points": [60, 60],
            "power_w_sum": [6000.0, 6000.0],
            "energy_wh_points": [60, 60],
            "energy_wh_sum": [1.5, 1.5],
            "voltage_v_points": [60, 60],
            "voltage_v_sum": [13_800.0, 13_800.0],
            "late_points_ignored": [0, 0],
        }
    )
    # Minute 0 got a corrected value, minute 1 a late point.
    now = ledger.drop("late_points_ignored").with_columns(
        pl.Series("power_w_sum", [6100.0, 6010.0]), pl.Series("power_w_points", [60, 61])
    )
    counted = late_minutes(now.select("bucket", *COUNTED), ledger, COUNTED)
    assert counted["bucket"].to_list() == [bucket + timedelta(minutes=1)]
    full = late_minutes(now, ledger)
    assert full["bucket"].to_list() == [bucket, bucket + timedelta(minutes=1)]
    assert full["extra_points"].to_list() == [1, 1]


@pytest.mark.parametrize(
    ("stored", "current", "points_now", "late"),
    [
        (6000.0, 6000.0, 60, False),
        (6000.0, 6100.0, 60, True),
        (6000.0, None, 60, False),  # InfluxDB could not encode its sum: unknown
        (float("inf"), None, 60, False),  # the client's sum overflowed too
        (float("inf"), 6000.0, 60, False),
        (float("inf"), None, 61, True),  # the count still sees a late point
    ],
)
def test_unknown_or_infinite_sums_are_no_evidence_but_counts_are(stored, current, points_now, late):
    bucket = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
    ledger = pl.DataFrame(
        {"bucket": [bucket], "power_w_points": [60], "power_w_sum": [stored],
         "late_points_ignored": [0]}
    )  # fmt: skip
    now = pl.DataFrame(
        {"bucket": [bucket], "power_w_points": [points_now], "power_w_sum": [current]},
        schema_overrides={"power_w_sum": pl.Float64},
    )
    compared = ("power_w_points", "power_w_sum")
    assert late_minutes(now, ledger, compared).height == int(late)
    # A minute InfluxDB holds nothing of any more is compared as zero points.
    assert late_minutes(now.clear(), ledger, compared).height == 1
