"""Device registry: import device metadata from CSV, and discover devices InfluxDB has seen.

A user pointing the pipeline at an existing InfluxDB registers its devices here, so that their
points are rolled up instead of quarantined as unknown devices. No Dagster here.
"""

from __future__ import annotations

import csv
import io
import re
import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path

import polars as pl
import psycopg
from psycopg import sql

from energy_pipeline.influx import InfluxClient, quote_ident, to_ns
from energy_pipeline.schemas import MAX_TAG_LENGTH
from energy_pipeline.storage import DEVICE_COLUMNS, upsert_devices

REQUIRED_COLUMNS = ("device_id", "household_id")
# A value no tag of a stored point can match (PostgreSQL also refuses NUL in text).
_UNREGISTRABLE = ("\x00", "\ufffd")
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
# Errors listed in full before the rest are only counted.
MAX_ERRORS = 50


class RegistryError(ValueError):
    """A device file or request was refused; nothing was written."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        shown = self.problems[:MAX_ERRORS]
        more = len(self.problems) - len(shown)
        super().__init__("\n".join(shown + ([f"... and {more} more"] if more else [])))


@cache
def known_timezones() -> frozenset[str]:
    """IANA timezone names zoneinfo knows (`UTC` included)."""
    return frozenset(zoneinfo.available_timezones())


def timezone_problem(name: str) -> str | None:
    """Why `name` is not a usable IANA timezone, or None when it is."""
    if not name:
        return "timezone is empty (write an IANA name such as Europe/Berlin, or UTC)"
    if name not in known_timezones():
        return f"timezone {name!r} is not an IANA timezone name (e.g. Europe/Berlin, UTC)"
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return f"timezone {name!r} cannot be loaded"
    return None


def _id_problem(column: str, value: str) -> str | None:
    if not value:
        return f"{column} is empty"
    if value != value.strip():
        # Ids are matched exactly against InfluxDB tags; a stray space after a comma is the
        # usual cause, and would register a device no point carries.
        return f"{column} {value!r} has leading or trailing spaces"
    if any(c in value for c in _UNREGISTRABLE):
        return f"{column} {value!r} holds NUL or an invalid character"
    if len(value) > MAX_TAG_LENGTH:
        # The contract rejects every point carrying such a tag: the device would never roll up.
        return f"{column} is {len(value)} characters long; at most {MAX_TAG_LENGTH} are allowed"
    return None


def parse_device_csv(data: bytes) -> pl.DataFrame:
    """Validate a device CSV and return its rows as a frame of the columns its header names.

    The header is required, must name `device_id` and `household_id` and may name `name`, `model`,
    `location`, `timezone` and `profile`; no other column. Empty optional values become NULL.
    Raises `RegistryError` listing every problem with its line number.
    """
    try:
        text = data.decode("utf-8-sig")  # spreadsheets often start the file with a BOM
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise RegistryError([f"line {line}: not UTF-8 text"]) from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise RegistryError([f"line 1: {exc}"]) from None
    if not header or not any(c.strip() for c in header):
        raise RegistryError(["line 1: the header is missing (the file is empty)"])
    columns = [c.strip() for c in header]
    problems: list[str] = []
    unknown = [c for c in columns if c not in DEVICE_COLUMNS]
    if unknown:
        problems.append(
            f"line 1: unknown column(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(DEVICE_COLUMNS)}"
        )
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        problems.append(
            f"line 1: the header must name {', '.join(missing)} "
            f"(the first line is the header: {', '.join(DEVICE_COLUMNS)})"
        )
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        problems.append(f"line 1: column(s) named twice: {', '.join(repeated)}")
    if problems:
        raise RegistryError(problems)

    rows: list[list[str | None]] = []
    first_line: dict[str, int] = {}
    line = reader.line_num + 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            problems.append(f"line {line}: {exc}")
            break
        start, line = line, reader.line_num + 1
        if not record or record == [""]:
            continue  # blank line
        if len(record) != len(columns):
            problems.append(f"line {start}: {len(record)} values, the header has {len(columns)}")
            continue
        values = dict(zip(columns, record, strict=True))
        row_problems = [p for c in REQUIRED_COLUMNS if (p := _id_problem(c, values[c])) is not None]
        if "timezone" in values and (p := timezone_problem(values["timezone"].strip())):
            row_problems.append(p)
        for c in ("name", "model", "location", "profile"):
            if c in values and "\x00" in values[c]:
                row_problems.append(f"{c} holds NUL")
        device = values["device_id"]
        if device in first_line:
            row_problems.append(f"device_id {device!r} is also on line {first_line[device]}")
        elif device:
            first_line[device] = start
        problems.extend(f"line {start}: {p}" for p in row_problems)
        if row_problems:
            continue
        rows.append(
            [values[c] if c in REQUIRED_COLUMNS else (values[c].strip() or None) for c in columns]
        )
    if problems:
        raise RegistryError(problems)
    ordered = [c for c in DEVICE_COLUMNS if c in columns]
    frame = pl.DataFrame(rows, schema={c: pl.String for c in columns}, orient="row")
    return frame.select(ordered)


@dataclass(frozen=True)
class ImportResult:
    """How an import changed the registry."""

    added: int
    updated: int
    unchanged: int


def _existing(conn: psycopg.Connection, ids: list[str], columns: list[str]) -> pl.DataFrame:
    schema = {c: pl.String for c in columns}
    with conn.cursor() as cur:
        cur.execute(
            sql.SQL("SELECT {} FROM energy.devices WHERE device_id = ANY(%s)").format(
                sql.SQL(", ").join(map(sql.Identifier, columns))
            ),
            (ids,),
        )
        rows = cur.fetchall()
    return pl.DataFrame(rows, schema=schema, orient="row")


def postgres_timezone_problems(conn: psycopg.Connection, names: list[str]) -> list[str]:
    """Names PostgreSQL does not know (its timezone data can lag Python's)."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT n FROM unnest(%s::text[]) n "
            "WHERE n NOT IN (SELECT name FROM pg_catalog.pg_timezone_names)",
            (names,),
        )
        return [r[0] for r in cur.fetchall()]


def import_devices(conn: psycopg.Connection, devices: pl.DataFrame) -> ImportResult:
    """Register new devices and update changed ones; unchanged rows are not touched."""
    if devices.height == 0:
        return ImportResult(0, 0, 0)
    if "timezone" in devices.columns:
        names = devices["timezone"].drop_nulls().unique().to_list()
        unknown = set(postgres_timezone_problems(conn, names))
        if unknown:
            lines = [
                f"device {d!r}: timezone {tz!r} is unknown to PostgreSQL"
                for d, tz in devices.select("device_id", "timezone").iter_rows()
                if tz in unknown
            ]
            raise RegistryError(lines)
    columns = devices.columns
    before = _existing(conn, devices["device_id"].to_list(), columns)
    joined = devices.join(before, on="device_id", how="left", suffix="_before")
    is_new = pl.col("household_id_before").is_null()
    differs = pl.any_horizontal(
        pl.col(c).ne_missing(pl.col(f"{c}_before")) for c in columns if c != "device_id"
    )
    changed = joined.filter(is_new | differs)
    added = changed.filter(is_new).height
    if changed.height:
        upsert_devices(conn, changed.select(columns))
    return ImportResult(added, changed.height - added, devices.height - changed.height)


def import_device_file(conn: psycopg.Connection, path: Path) -> ImportResult:
    """Validate a whole device CSV, then upsert it in one transaction (nothing if a line is bad)."""
    return import_devices(conn, parse_device_csv(path.read_bytes()))


def parse_duration(text: str) -> timedelta:
    """`90s`, `30m`, `24h`, `7d`, `2w` as a timedelta."""
    match = _DURATION.match(text)
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"{text!r} is not a duration such as 30m, 24h or 7d")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def seen_tag_pairs(influx: InfluxClient, measurement: str, since: datetime) -> pl.DataFrame:
    """(device_id, household_id, points) for every tag pair with points since `since`."""
    q = (
        f'SELECT count("power_w"::float) AS power_w, count("energy_wh"::float) AS energy_wh '
        f"FROM {quote_ident(measurement)} WHERE time >= $since "
        'GROUP BY "device_id", "household_id"'
    )
    rows: list[tuple[str, str, int]] = []
    for result in influx.query_json(q, {"since": to_ns(since)}):
        for series in result.get("series", []):
            tags = series.get("tags") or {}
            columns = series["columns"]
            points = sum(
                max(int(v[columns.index(f)] or 0) for f in ("power_w", "energy_wh"))
                for v in series.get("values") or []
            )
            rows.append((tags.get("device_id", ""), tags.get("household_id", ""), points))
    return pl.DataFrame(
        rows,
        schema={"device_id": pl.String, "household_id": pl.String, "points": pl.Int64},
        orient="row",
    )


@dataclass
class Discovery:
    """What InfluxDB holds that the registry does not match."""

    since: datetime
    # device_id, household_id, points: unregistered devices seen with exactly one household.
    unknown: pl.DataFrame
    # device_id, households (list), points: unregistered, seen with several households.
    ambiguous: pl.DataFrame
    # device_id, registered_household_id, household_id (tag), points.
    mismatched: pl.DataFrame
    # device_id, household_id, points: tag values that no registry row can match.
    unregistrable: pl.DataFrame
    registered: list[str] = field(default_factory=list)


def discover(
    conn: psycopg.Connection, influx: InfluxClient, measurement: str, since: datetime
) -> Discovery:
    """Compare the tag pairs InfluxDB saw since `since` with the registry."""
    seen = seen_tag_pairs(influx, measurement, since)
    with conn.cursor() as cur:
        cur.execute("SELECT device_id, household_id FROM energy.devices")
        registry = pl.DataFrame(
            cur.fetchall(),
            schema={"device_id": pl.String, "registered_household_id": pl.String},
            orient="row",
        )
    bad_id = pl.lit(False)
    for column in ("device_id", "household_id"):
        value = pl.col(column)
        bad_id = (
            bad_id
            | (value == "")
            | (value.str.len_chars() > MAX_TAG_LENGTH)
            | pl.any_horizontal(value.str.contains(c, literal=True) for c in _UNREGISTRABLE)
        )
    unregistrable = seen.filter(bad_id)
    seen = seen.filter(~bad_id).join(registry, on="device_id", how="left")
    mismatched = seen.filter(
        pl.col("registered_household_id").is_not_null()
        & (pl.col("registered_household_id") != pl.col("household_id"))
    ).select("device_id", "registered_household_id", "household_id", "points")
    new = (
        seen.filter(pl.col("registered_household_id").is_null())
        .group_by("device_id")
        .agg(pl.col("household_id").sort().alias("households"), pl.col("points").sum())
        .sort("device_id")
    )
    single = pl.col("households").list.len() == 1
    return Discovery(
        since=since,
        unknown=new.filter(single).select(
            "device_id", pl.col("households").list.first().alias("household_id"), "points"
        ),
        ambiguous=new.filter(~single),
        mismatched=mismatched.sort("device_id", "household_id"),
        unregistrable=unregistrable.sort("device_id", "household_id"),
    )


def register_discovered(conn: psycopg.Connection, found: Discovery) -> list[str]:
    """Register the unknown devices with their tag household, in that household's timezone.

    A household that already has registered devices lends its timezone (the one most of its
    devices have); otherwise the device gets the registry's default, UTC.
    """
    if found.unknown.height == 0:
        return []
    with conn.cursor() as cur:
        cur.execute("SELECT household_id, timezone FROM energy.bi_households")
        zones = pl.DataFrame(
            cur.fetchall(),
            schema={"household_id": pl.String, "timezone": pl.String},
            orient="row",
        )
    frame = (
        found.unknown.join(zones, on="household_id", how="left")
        .with_columns(pl.col("timezone").fill_null("UTC"))
        .select("device_id", "household_id", "timezone")
    )
    upsert_devices(conn, frame)
    found.registered = frame["device_id"].to_list()
    return found.registered
