"""Device registry: CSV import (line-numbered errors, all or nothing, idempotent) and discovery
of the devices InfluxDB has seen, against the real servers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import psycopg
import pytest

from energy_pipeline.cli import main
from energy_pipeline.devtools.lineprotocol import encode_points
from energy_pipeline.influx import InfluxClient, to_ns
from energy_pipeline.registry import (
    RegistryError,
    discover,
    parse_device_csv,
    parse_duration,
    register_discovered,
)

GOOD = """device_id,household_id,name,model,location,timezone,profile
d1,h1,Fridge,F-100,Kitchen,Europe/Berlin,fridge
d2,h1,"Heat pump, cellar",HP-7,,Europe/Berlin,hvac
dev é 3,h2,Charger,EV-2,Garage,America/New_York,ev_charger
"""


@pytest.fixture
def env(monkeypatch, pg_dsn: str, influx_server, influx_db: InfluxClient) -> InfluxClient:
    """The command line pointed at this test's databases."""
    monkeypatch.setenv("ENERGY_PG_DSN", pg_dsn)
    monkeypatch.setenv("INFLUXDB_URL", influx_server.url)
    monkeypatch.setenv("INFLUXDB_DATABASE", influx_db.database)
    monkeypatch.setenv("INFLUXDB_MEASUREMENT", "telemetry")
    for name in ("INFLUXDB_TOKEN", "INFLUXDB_USERNAME", "INFLUXDB_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    return influx_db


def registry(dsn: str) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT device_id, household_id, name, model, location, timezone, profile, updated_at "
            "FROM energy.devices ORDER BY device_id"
        ).fetchall()


def write_csv(tmp_path: Path, text: str, name: str = "devices.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode())
    return path


def test_parse_keeps_ids_exactly_and_optional_blanks_as_null():
    frame = parse_device_csv(GOOD.encode())
    assert frame.columns == [
        "device_id", "household_id", "name", "model", "location", "timezone", "profile"
    ]  # fmt: skip
    assert frame.row(1) == ("d2", "h1", "Heat pump, cellar", "HP-7", None, "Europe/Berlin", "hvac")
    assert frame["device_id"].to_list() == ["d1", "d2", "dev é 3"]


def test_parse_accepts_a_subset_of_columns_in_any_order_and_a_bom():
    frame = parse_device_csv("\ufeffhousehold_id,device_id\nh1,d1\n\nh2,d2\n".encode())
    assert frame.to_dicts() == [
        {"device_id": "d1", "household_id": "h1"},
        {"device_id": "d2", "household_id": "h2"},
    ]


@pytest.mark.parametrize(
    ("text", "problems"),
    [
        ("", ["line 1: the header is missing"]),
        (
            "d1,h1,Fridge\n",
            [
                "line 1: unknown column(s) 'd1', 'h1', 'Fridge'",
                "line 1: the header must name device_id, household_id",
            ],
        ),
        ("device_id,household_id,colour\nd1,h1,red\n", ["line 1: unknown column(s) 'colour'"]),
        (
            "device_id,household_id,device_id\nd1,h1,d1\n",
            ["line 1: column(s) named twice: device_id"],
        ),
        ("device_id,name\nd1,x\n", ["line 1: the header must name household_id"]),
        (
            "device_id,household_id,timezone\n"
            "d1,h1,Europe/Berlin\n"
            "d2,h1,Mars/Olympus\n"
            "d3,,UTC\n"
            "d4,h2\n"
            "d1,h3,UTC\n"
            " d5,h1,UTC\n"
            "d6,h1,\n",
            [
                "line 3: timezone 'Mars/Olympus' is not an IANA timezone name",
                "line 4: household_id is empty",
                "line 5: 2 values, the header has 3",
                "line 6: device_id 'd1' is also on line 2",
                "line 7: device_id ' d5' has leading or trailing spaces",
                "line 8: timezone is empty",
            ],
        ),
        # A quoted value spanning lines: errors name the line its record starts on.
        ('device_id,household_id,name\nd1,h1,"two\nlines"\nd2,h1,x,y\n', ["line 4: 4 values"]),
        ('device_id,household_id\nd1,"h1\n', ["line 2: unexpected end of data"]),
        (b"device_id,household_id\nd1,h1\nd2,h\xff\n", ["line 3: not UTF-8 text"]),
        ("device_id,household_id,name\nd1,h1,a\x00b\n", ["line 2: name holds NUL"]),
        ("device_id,household_id\nd1," + "h" * 257 + "\n",
         ["line 2: household_id is 257 characters long; at most 256"]),
    ],
)  # fmt: skip
def test_parse_names_the_line_and_the_problem(text: str | bytes, problems: list[str]):
    data = text if isinstance(text, bytes) else text.encode()
    with pytest.raises(RegistryError) as caught:
        parse_device_csv(data)
    assert len(caught.value.problems) == len(problems), caught.value.problems
    for got, expected in zip(caught.value.problems, problems, strict=True):
        assert got.startswith(expected), (got, expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("90s", timedelta(seconds=90)), ("30m", timedelta(minutes=30)), ("24h", timedelta(days=1)),
     ("7d", timedelta(days=7)), ("2w", timedelta(days=14))],
)  # fmt: skip
def test_parse_duration(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "24", "h", "0h", "-1h", "1y", "1.5h"])
def test_parse_duration_refuses(text):
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_import_upserts_and_reimport_changes_nothing(env, pg_dsn, tmp_path, capsys):
    path = write_csv(tmp_path, GOOD)
    assert main(["devices", "import", str(path)]) == 0
    assert "3 devices added, 0 updated, 0 unchanged" in capsys.readouterr().out
    first = registry(pg_dsn)
    assert [r[:7] for r in first] == [
        ("d1", "h1", "Fridge", "F-100", "Kitchen", "Europe/Berlin", "fridge"),
        ("d2", "h1", "Heat pump, cellar", "HP-7", None, "Europe/Berlin", "hvac"),
        ("dev é 3", "h2", "Charger", "EV-2", "Garage", "America/New_York", "ev_charger"),
    ]

    assert main(["devices", "import", str(path)]) == 0
    assert "0 devices added, 0 updated, 3 unchanged" in capsys.readouterr().out
    assert registry(pg_dsn) == first  # updated_at included: unchanged rows are not rewritten

    # A file naming fewer columns changes only those; the others keep their values.
    moved = write_csv(tmp_path, "device_id,household_id,location\nd2,h1,Attic\nd9,h9,\n", "b.csv")
    assert main(["devices", "import", str(moved)]) == 0
    assert "1 devices added, 1 updated, 0 unchanged" in capsys.readouterr().out
    rows = {r[0]: r for r in registry(pg_dsn)}
    assert rows["d2"][:7] == (
        "d2",
        "h1",
        "Heat pump, cellar",
        "HP-7",
        "Attic",
        "Europe/Berlin",
        "hvac",
    )
    assert rows["d2"][7] > first[1][7]
    assert rows["d9"][:7] == ("d9", "h9", None, None, None, "UTC", None)
    assert rows["d1"] == first[0]


def test_a_bad_line_writes_nothing(env, pg_dsn, tmp_path, capsys):
    assert main(["devices", "import", str(write_csv(tmp_path, GOOD))]) == 0
    before = registry(pg_dsn)
    bad = write_csv(
        tmp_path,
        "device_id,household_id,name,timezone\n"
        "d1,h7,Renamed,UTC\n"
        "new,h1,New,Europe/Berlin\n"
        "d2,h1,x,Europe/Berlim\n",
        "bad.csv",
    )
    assert main(["devices", "import", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad} was not imported (nothing written)" in err
    assert f"{bad}: line 4: timezone 'Europe/Berlim' is not an IANA timezone name" in err
    assert registry(pg_dsn) == before

    assert main(["devices", "import", str(tmp_path / "missing.csv")]) == 2
    assert "no such file" in capsys.readouterr().err


def points(rows: list[tuple[str, str, datetime]]) -> bytes:
    """One point per (device, household, time), as devices write them."""
    return encode_points(
        pl.DataFrame(
            {
                "time": [to_ns(t) for _, _, t in rows],
                "device_id": [d for d, _, _ in rows],
                "household_id": [h for _, h, _ in rows],
                "power_w": [100.0] * len(rows),
                "energy_wh": [0.03] * len(rows),
                "voltage_v": [None] * len(rows),
            },
            schema_overrides={"time": pl.Int64, "voltage_v": pl.Float64},
        )
    )


def test_discover_lists_unknown_and_mismatched_devices_and_registers(env, pg_dsn, tmp_path, capsys):
    influx = env
    assert main(["devices", "import", str(write_csv(tmp_path, GOOD))]) == 0
    now = datetime.now(UTC).replace(microsecond=0)
    recent = [now - timedelta(minutes=m) for m in (1, 2, 3)]
    influx.write_lines(
        points(
            [("d1", "h1", t) for t in recent]  # registered, as tagged
            + [("d2", "h-other", t) for t in recent[:2]]  # registered in h1, tagged h-other
            + [("new, one", "h1", t) for t in recent]  # unknown, in a registered household
            + [("new-2", "h5", recent[0])]  # unknown, new household
            + [("roamer", "h6", recent[0]), ("roamer", "h7", recent[1])]  # two households
            + [("old", "h8", now - timedelta(days=3))]  # outside --since
        )
    )
    capsys.readouterr()
    assert main(["devices", "discover"]) == 0
    out = capsys.readouterr().out
    assert "unregistered devices: 2" in out
    assert "'new, one'  household h1  3 points" in out
    assert "new-2  household h5  1 points" in out
    assert "roamer  households h6, h7  2 points" in out
    assert "differs from the registry: 1" in out
    assert "d2  registered h1  tagged h-other  2 points" in out
    assert "old" not in out.replace("household", "")
    assert "--register" in out
    assert {r[0] for r in registry(pg_dsn)} == {"d1", "d2", "dev é 3"}  # nothing registered

    assert main(["devices", "discover", "--since", "4d", "--register"]) == 0
    out = capsys.readouterr().out
    assert "unregistered devices: 3" in out and "registered 3 devices" in out
    rows = {r[0]: r[:7] for r in registry(pg_dsn)}
    # A device of a known household gets the household's timezone; others UTC.
    assert rows["new, one"] == ("new, one", "h1", None, None, None, "Europe/Berlin", None)
    assert rows["new-2"] == ("new-2", "h5", None, None, None, "UTC", None)
    assert rows["old"][1] == "h8"
    assert "roamer" not in rows  # ambiguous household: left for a CSV import
    assert rows["d2"][1] == "h1"  # a mismatch is reported, never re-registered

    with psycopg.connect(pg_dsn) as conn:
        found = discover(conn, influx, "telemetry", now - timedelta(days=4))
        assert found.unknown.height == 0
        assert found.ambiguous["device_id"].to_list() == ["roamer"]
        assert found.mismatched.rows() == [("d2", "h1", "h-other", 2)]
        assert register_discovered(conn, found) == []


def test_discover_quotes_the_measurement_and_skips_untagged_points(env, pg_dsn):
    influx = env
    now = datetime.now(UTC)
    ns = to_ns(now - timedelta(minutes=1))
    influx.write_lines(
        [
            f'odd\\ "name,device_id=x1,household_id=h1 power_w=1,energy_wh=0.1 {ns}',
            f'odd\\ "name,household_id=h1 power_w=1,energy_wh=0.1 {ns}',  # no device tag
            f'odd\\ "name,device_id=x2,household_id=h2 energy_wh=0.1 {ns}',  # no power_w
            f'odd\\ "name,device_id={"x" * 257},household_id=h1 power_w=1 {ns}',  # too long
        ]
    )
    with psycopg.connect(pg_dsn) as conn:
        found = discover(conn, influx, 'odd "name', now - timedelta(hours=1))
    assert found.unknown.rows() == [("x1", "h1", 1), ("x2", "h2", 1)]
    assert found.unregistrable.rows() == [("", "h1", 1), ("x" * 257, "h1", 1)]
