"""Pure tests of line-protocol escaping, validation and encoding (no server)."""

from __future__ import annotations

import math

import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from energy_pipeline.devtools.lineprotocol import (
    LineProtocolError,
    encode_points,
    escape_measurement,
    escape_tag,
)


def parse_tag_value(line: str) -> tuple[str, str]:
    """How InfluxDB 1.x reads a tag value: it ends at a `,` or space not preceded by a backslash,
    then `\\,`, `\\=` and `\\ ` are unescaped; other backslashes stay literal.
    Returns (value, rest).
    """
    i = 0
    while i < len(line) and not (line[i] in ", " and (i == 0 or line[i - 1] != "\\")):
        i += 1
    raw = line[:i]
    for c in ",= ":
        raw = raw.replace("\\" + c, c)
    return raw, line[i:]


def representable(value: str) -> bool:
    return (
        value != ""
        and "\n" not in value
        and "\r" not in value
        and not value.endswith("\\")
        and not any("\\" + c in value for c in ",= ")
    )


def frame(**columns: list) -> pl.DataFrame:
    base = {
        "time": [1_700_000_000_000_000_000],
        "device_id": ["dev-1"],
        "household_id": ["hh-1"],
        "power_w": [1.5],
        "energy_wh": [0.25],
        "voltage_v": [230.1],
    }
    base.update(columns)
    return pl.DataFrame(base).with_columns(
        pl.col("time").cast(pl.Int64),
        pl.col("power_w", "energy_wh", "voltage_v").cast(pl.Float64),
    )


@pytest.mark.parametrize(
    ("value", "escaped"),
    [
        ("plain", "plain"),
        ("a b", "a\\ b"),
        ("a,b", "a\\,b"),
        ("a=b", "a\\=b"),
        ('say "hi"', 'say\\ "hi"'),
        ("café\\;", "café\\;"),
        ("x' OR 1=1; --", "x'\\ OR\\ 1\\=1;\\ --"),
        ("冷蔵庫 🔌", "冷蔵庫\\ 🔌"),
    ],
)
def test_escape_tag(value: str, escaped: str) -> None:
    assert escape_tag(value) == escaped
    assert parse_tag_value(escaped + ",next=1") == (value, ",next=1")


@pytest.mark.parametrize("value", ["", "a\\", "a\\,b", "a\\ b", "a\\=b", "a\nb", "a\rb"])
def test_escape_tag_rejects_unrepresentable(value: str) -> None:
    with pytest.raises(LineProtocolError):
        escape_tag(value)


@given(st.text(min_size=1).filter(representable))
def test_escape_tag_round_trips(value: str) -> None:
    escaped = escape_tag(value)
    assert parse_tag_value(escaped + " field=1") == (value, " field=1")


@given(st.text().filter(lambda v: not representable(v)))
def test_escape_tag_rejects_every_unrepresentable_value(value: str) -> None:
    with pytest.raises(LineProtocolError):
        escape_tag(value)


def test_encode_tiny_frame_literal() -> None:
    points = pl.DataFrame(
        {
            "time": [1_700_000_000_000_000_000, 1_700_000_001_000_000_000],
            "device_id": ["dev-1", 'Küche fridge, "main"=1'],
            "household_id": ["hh-1", "hh 2"],
            "power_w": [1.5, 3.0],
            "energy_wh": [0.01, None],
            "voltage_v": [None, 1e20],
        }
    )
    assert (
        encode_points(points)
        == (
            "telemetry,device_id=dev-1,household_id=hh-1 power_w=1.5,energy_wh=0.01"
            " 1700000000000000000\n"
            'telemetry,device_id=Küche\\ fridge\\,\\ "main"\\=1,household_id=hh\\ 2'
            " power_w=3.0,voltage_v=1e+20 1700000001000000000"
        ).encode()
    )


@pytest.mark.parametrize(
    ("nulls", "fields"),
    [
        ({}, "power_w=1.5,energy_wh=0.25,voltage_v=230.1"),
        ({"power_w": [None]}, "energy_wh=0.25,voltage_v=230.1"),
        ({"energy_wh": [None]}, "power_w=1.5,voltage_v=230.1"),
        ({"power_w": [None], "voltage_v": [None]}, "energy_wh=0.25"),
    ],
)
def test_null_fields_are_omitted(nulls: dict, fields: str) -> None:
    line = encode_points(frame(**nulls), measurement="m").decode()
    assert line == f"m,device_id=dev-1,household_id=hh-1 {fields} 1700000000000000000"


@pytest.mark.parametrize("value", [0.0, -0.0, 3.0, -7.0, 1e16, 1e20, 1.5e-7, 5e-324, 0.1 + 0.2])
def test_floats_stay_floats_and_round_trip(value: float) -> None:
    line = encode_points(frame(power_w=[value], energy_wh=[None], voltage_v=[None])).decode()
    text = line.split(" ")[1].removeprefix("power_w=")
    assert any(c in text for c in ".eE")
    assert float(text) == value


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_any_finite_float_is_written_exactly(value: float) -> None:
    line = encode_points(frame(power_w=[value], energy_wh=[None], voltage_v=[None])).decode()
    text = line.split(" ")[1].removeprefix("power_w=")
    assert any(c in text for c in ".eE") and float(text) == value


def test_measurement_is_escaped() -> None:
    assert escape_measurement("my meas,x") == "my\\ meas\\,x"
    assert encode_points(frame(), measurement="a b").startswith(b"a\\ b,device_id=")


@pytest.mark.parametrize("name", ["", "#comment", "a\\", "a\nb"])
def test_bad_measurement_rejected(name: str) -> None:
    with pytest.raises(LineProtocolError, match="measurement"):
        encode_points(frame(), measurement=name)


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"device_id": [None]}, "null or empty device_id"),
        ({"household_id": [""]}, "null or empty household_id"),
        ({"device_id": ["ends\\"]}, "device_id ends with a backslash"),
        ({"household_id": ["a\\,b"]}, "household_id ends with a backslash or has one before"),
        ({"device_id": ["a\\ b"]}, "device_id ends with a backslash or has one before"),
        ({"device_id": ["a\nb"]}, "line break in device_id"),
        ({"household_id": ["a\rb"]}, "line break in household_id"),
        ({"power_w": [None], "energy_wh": [None], "voltage_v": [None]}, "no field"),
        ({"power_w": [math.nan]}, "non-finite"),
        ({"voltage_v": [math.inf]}, "non-finite"),
        ({"energy_wh": [-math.inf]}, "non-finite"),
        ({"time": [None]}, "null time"),
    ],
)
def test_invalid_points_rejected_with_row_and_value(columns: dict, message: str) -> None:
    good = frame()
    bad = pl.concat([good, good, frame(**columns)])
    with pytest.raises(LineProtocolError, match=message) as raised:
        encode_points(bad)
    assert "1 row(s)" in str(raised.value)
    assert "(2, " in str(raised.value)  # names the offending row index


def test_all_problems_reported_at_once() -> None:
    bad = pl.concat([frame(device_id=[""]), frame(power_w=[math.nan])])
    with pytest.raises(LineProtocolError) as raised:
        encode_points(bad)
    assert "empty device_id" in str(raised.value) and "non-finite" in str(raised.value)


def test_missing_column_rejected() -> None:
    with pytest.raises(LineProtocolError, match="lacks columns"):
        encode_points(frame().drop("voltage_v"))


def test_empty_frame_encodes_to_nothing() -> None:
    assert encode_points(frame().clear()) == b""


def test_integer_columns_are_written_as_floats() -> None:
    points = frame().with_columns(pl.col("power_w").cast(pl.Int64) * 0 + 3)
    assert b" power_w=3.0," in encode_points(points)
