"""InfluxDB client against a real server: reads, quoting, errors, authentication."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl
import pytest

from energy_pipeline.devtools.lineprotocol import encode_points
from energy_pipeline.devtools.services import LocalInflux, free_port
from energy_pipeline.influx import (
    InfluxAnswerError,
    InfluxClient,
    InfluxError,
    quote_ident,
    to_ns,
)
from energy_pipeline.sources import read_window

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
NS = to_ns(T0)


def _points(client: InfluxClient, *args, **kwargs) -> pl.DataFrame:
    return read_window(client, *args, **kwargs).points


def test_read_points_round_trips_hostile_tags_and_missing_fields(influx_db: InfluxClient):
    influx_db.write_lines(
        [
            f'telemetry,device_id=a\\ b\\,c\\=d,household_id=h"1 power_w=1.5,energy_wh=0.25 {NS}',
            f"telemetry,device_id=caf\u00e9;'x',household_id=h2 power_w=2.0 {NS + 10**9}",
            f"telemetry,device_id=z,household_id=h2 power_w=9.0 {NS + 60 * 10**9}",  # next minute
        ]
    )
    frame = _points(influx_db, "telemetry", T0, T0.replace(minute=1))
    assert frame.columns == [
        "time",
        "device_id",
        "household_id",
        "power_w",
        "energy_wh",
        "voltage_v",
    ]
    assert frame.sort("time").rows() == [
        (NS, "a b,c=d", 'h"1', 1.5, 0.25, None),
        (NS + 10**9, "caf\u00e9;'x'", "h2", 2.0, None, None),
    ]


def test_empty_window_gives_an_empty_frame_with_the_schema(influx_db: InfluxClient):
    frame = _points(influx_db, "telemetry", T0, T0.replace(minute=1))
    assert frame.height == 0
    assert frame.schema["time"] == pl.Int64


def test_measurement_names_are_quoted_not_pasted(influx_db: InfluxClient):
    influx_db.write_lines([f"telemetry,device_id=a,household_id=h power_w=1.0 {NS}"])
    evil = 'telemetry" WHERE 1=1; DROP MEASUREMENT "telemetry'
    assert _points(influx_db, evil, T0, T0.replace(minute=1)).height == 0
    assert _points(influx_db, "telemetry", T0, T0.replace(minute=1)).height == 1
    assert quote_ident('a"b\\') == '"a\\"b\\\\"'


def test_unknown_database_is_a_clear_error(influx_server: LocalInflux):
    client = InfluxClient(influx_server.url, "no_such_db")
    with pytest.raises(InfluxError, match="database not found: no_such_db"):
        _points(client, "telemetry", T0, T0.replace(minute=1))


def test_unreachable_server_is_a_clear_error_after_retries():
    client = InfluxClient(f"http://127.0.0.1:{free_port()}", "x", retries=2, backoff_s=0.01)
    with pytest.raises(InfluxError, match="cannot reach InfluxDB|kept failing"):
        client.ping()


def test_bad_query_reports_influxdb_message(influx_db: InfluxClient):
    with pytest.raises(InfluxError, match="error parsing query"):
        influx_db.query_frame("SELEC nonsense")


def test_answer_that_is_not_json_is_an_influx_error_quoting_it(influx_db: InfluxClient):
    # InfluxDB 1.x cannot encode a sum past the float range and answers 200 with its message.
    influx_db.write_lines(
        [f"telemetry,device_id=a power_w=1.7e308 {NS + i * 10**9}" for i in range(3)]
    )
    q = 'SELECT sum("power_w") FROM "telemetry" WHERE time >= $start AND time < $end'
    with pytest.raises(InfluxAnswerError, match=r"not JSON: 'json: .*unsupported value: \+Inf"):
        influx_db.query_json(q, {"start": NS, "end": NS + 60 * 10**9})


@pytest.mark.parametrize(("url", "database"), [("localhost:8086", "db"), ("http://x", "")])
def test_bad_configuration_is_rejected(url: str, database: str):
    with pytest.raises(InfluxError):
        InfluxClient(url, database)


def test_naive_datetimes_are_rejected():
    with pytest.raises(ValueError, match="naive"):
        to_ns(datetime(2026, 1, 1))


def test_username_password_auth_against_a_server_that_requires_it(tmp_path):
    tmp_path.chmod(0o755)
    server = LocalInflux(tmp_path / "influx-auth", free_port(), auth=True)
    server.start()
    try:
        server.create_admin("admin", "s3cret")
        good = InfluxClient(server.url, "authdb", username="admin", password="s3cret")
        good.create_database()
        good.write_lines([f"telemetry,device_id=a,household_id=h power_w=1.0 {NS}"])
        assert _points(good, "telemetry", T0, T0.replace(minute=1)).height == 1
        bad = InfluxClient(server.url, "authdb", username="admin", password="wrong")
        with pytest.raises(InfluxError, match="refused the credentials"):
            _points(bad, "telemetry", T0, T0.replace(minute=1))
        anonymous = InfluxClient(server.url, "authdb")
        with pytest.raises(InfluxError, match="refused the credentials"):
            _points(anonymous, "telemetry", T0, T0.replace(minute=1))
    finally:
        server.stop()


def test_token_is_sent_as_authorization_header_and_never_shown():
    client = InfluxClient("http://127.0.0.1:1", "db", token="tok-123")
    assert client.session.headers["Authorization"] == "Token tok-123"
    assert "tok-123" not in repr(client)


@pytest.mark.parametrize("parallel", [2, 3, 4])
def test_parallel_series_slices_read_every_point_exactly_once(influx_db: InfluxClient, parallel):
    ids = [f"dev-{i}" for i in range(12)] + ["plain", "x' OR 1=1", "Küche 5a", "back\\slash"]
    points = pl.DataFrame(
        {
            "time": [NS + k * 10**6 for k in range(len(ids))],
            "device_id": ids,
            "household_id": ["h"] * len(ids),
            "power_w": [float(k) for k in range(len(ids))],
            "energy_wh": [0.1] * len(ids),
            "voltage_v": [None] * len(ids),
        },
        schema_overrides={"voltage_v": pl.Float64},
    )
    influx_db.write_lines(encode_points(points))
    influx_db.write_lines([f"telemetry,household_id=h power_w=99.0 {NS + 10**9}"])  # no device tag
    one = _points(influx_db, "telemetry", T0, T0.replace(minute=1))
    many = _points(influx_db, "telemetry", T0, T0.replace(minute=1), parallel=parallel)
    assert one.height == len(ids) + 1
    assert many.sort("time").equals(one.sort("time"))


def test_compactions_pending_reads_this_databases_engine_stats(influx_db: InfluxClient):
    influx_db.write_lines([f"telemetry,device_id=a,household_id=h power_w=1.0 {NS}"])
    assert influx_db.compactions_pending() >= 0
    other = InfluxClient(influx_db.url, "no_such_db")
    assert other.compactions_pending() == 0


def test_unknown_retention_policy_is_a_clear_error_not_an_empty_minute(influx_db: InfluxClient):
    influx_db.write_lines([f"telemetry,device_id=a,household_id=h power_w=1.0 {NS}"])
    wrong = InfluxClient(influx_db.url, influx_db.database, retention_policy="no_such_rp")
    with pytest.raises(InfluxError, match="retention policy not found"):
        _points(wrong, "telemetry", T0, T0.replace(minute=1))
