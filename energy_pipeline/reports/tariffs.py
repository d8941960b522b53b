"""Tariffs and their assignment to households: read from YAML or CSV, validated, applied in one
transaction (re-applying a file changes nothing). No Dagster here.

YAML (examples/tariffs.yaml)::

    tariffs:
      - id: flat-eur
        currency: EUR
        default: true
        bands: [{start: "00:00", end: "24:00", price_per_kwh: 0.30}]
    assignments:
      - {household_id: hh-0001, tariff: flat-eur, from: 2026-01-01}

CSV: a band file (header `tariff_id,currency,start,end,price_per_kwh[,default]`, one row per band)
or an assignment file (header `household_id,tariff_id[,valid_from]`).
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from datetime import date
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import psycopg
import yaml

from energy_pipeline.config import FALSE_WORDS, TRUE_WORDS

DAY_MINUTES = 1440
BAND_STEP_MINUTES = 5  # bands price whole 5-minute windows
EARLIEST = date(2000, 1, 1)
_CLOCK = re.compile(r"^([01]?\d|2[0-4]):([0-5]\d)$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")


class TariffError(ValueError):
    """A tariff file is malformed; the message says where and why."""


@dataclass(frozen=True)
class Band:
    """Price per kWh over [start_minute, end_minute) of the local day."""

    start_minute: int
    end_minute: int
    price_per_kwh: Decimal


@dataclass(frozen=True)
class Tariff:
    tariff_id: str
    currency: str
    bands: tuple[Band, ...]
    is_default: bool = False


@dataclass(frozen=True)
class Assignment:
    household_id: str
    tariff_id: str
    valid_from: date


@dataclass(frozen=True)
class TariffFile:
    tariffs: tuple[Tariff, ...]
    assignments: tuple[Assignment, ...]


def _minute(value: Any, where: str) -> int:
    match = _CLOCK.match(str(value).strip())
    if not match:
        raise TariffError(f"{where}: {value!r} is not a clock time HH:MM (00:00 to 24:00)")
    minute = int(match[1]) * 60 + int(match[2])
    if minute > DAY_MINUTES:
        raise TariffError(f"{where}: {value!r} is after 24:00")
    if minute % BAND_STEP_MINUTES:
        raise TariffError(f"{where}: {value!r} is not on a {BAND_STEP_MINUTES}-minute boundary")
    return minute


def _price(value: Any, where: str) -> Decimal:
    try:
        price = Decimal(str(value).strip())
    except InvalidOperation:
        raise TariffError(f"{where}: price {value!r} is not a number") from None
    if not price.is_finite() or price < 0:
        raise TariffError(f"{where}: price {value!r} must be a number >= 0")
    return price


def _text(value: Any, where: str) -> str:
    text = "" if value is None else str(value).strip()
    if not text or "\x00" in text:
        raise TariffError(f"{where} is empty")
    return text


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value or "").strip().lower()
    if text == "" or text in FALSE_WORDS:
        return False
    if text in TRUE_WORDS:
        return True
    raise TariffError(f"{where}: {value!r} is not true/false")


def _date(value: Any, where: str) -> date:
    if value is None or value == "":
        return EARLIEST
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value).strip())
    except ValueError:
        raise TariffError(f"{where}: {value!r} is not a date YYYY-MM-DD") from None


def band_pieces(start: int, end: int) -> list[tuple[int, int]]:
    """[start, end) in minutes of the day; a band crossing midnight (end <= start) is split."""
    if start == end:
        raise TariffError(f"band {start // 60:02d}:{start % 60:02d} starts where it ends")
    return [(start, end)] if start < end else [(start, DAY_MINUTES), (0, end)]


def check_cover(tariff_id: str, bands: list[Band]) -> tuple[Band, ...]:
    """Bands sorted by start, if they cover the local day exactly once."""
    ordered = sorted(bands, key=lambda b: b.start_minute)
    at = 0
    for band in ordered:
        if band.start_minute != at:
            gap_or_overlap = "overlap" if band.start_minute < at else "gap"
            raise TariffError(
                f"tariff {tariff_id}: bands {gap_or_overlap} at {at // 60:02d}:{at % 60:02d}"
            )
        at = band.end_minute
    if at != DAY_MINUTES:
        raise TariffError(
            f"tariff {tariff_id}: bands end at {at // 60:02d}:{at % 60:02d}, not 24:00"
        )
    return tuple(ordered)


def _tariff(raw: Any, where: str) -> Tariff:
    if not isinstance(raw, dict):
        raise TariffError(f"{where} must be a mapping with id, currency and bands")
    tariff_id = _text(raw.get("id"), f"{where}: id")
    currency = _text(raw.get("currency"), f"{where}: currency").upper()
    if not _CURRENCY.match(currency):
        raise TariffError(f"{where}: currency {currency!r} is not a 3-letter code such as EUR")
    raw_bands = raw.get("bands")
    if not isinstance(raw_bands, list) or not raw_bands:
        raise TariffError(f"tariff {tariff_id}: bands must be a non-empty list")
    bands = []
    for i, b in enumerate(raw_bands):
        at = f"tariff {tariff_id} band {i + 1}"
        if not isinstance(b, dict):
            raise TariffError(f"{at} must be a mapping with start, end and price_per_kwh")
        price = _price(b.get("price_per_kwh"), at)
        start, end = _minute(b.get("start"), at), _minute(b.get("end"), at)
        bands += [Band(s, e, price) for s, e in band_pieces(start % DAY_MINUTES, end)]
    return Tariff(
        tariff_id, currency, check_cover(tariff_id, bands), _bool(raw.get("default"), where)
    )


def _assignment(raw: Any, where: str) -> Assignment:
    if not isinstance(raw, dict):
        raise TariffError(f"{where} must be a mapping with household_id and tariff")
    return Assignment(
        _text(raw.get("household_id"), f"{where}: household_id"),
        _text(raw.get("tariff") or raw.get("tariff_id"), f"{where}: tariff"),
        _date(raw.get("from") or raw.get("valid_from"), f"{where}: from"),
    )


def _checked(tariffs: list[Tariff], assignments: list[Assignment]) -> TariffFile:
    ids = [t.tariff_id for t in tariffs]
    if dupes := sorted({i for i in ids if ids.count(i) > 1}):
        raise TariffError(f"tariff defined twice: {', '.join(dupes)}")
    if sum(t.is_default for t in tariffs) > 1:
        raise TariffError("more than one tariff is marked default")
    keys = [(a.household_id, a.valid_from) for a in assignments]
    if dupes_a := sorted({k for k in keys if keys.count(k) > 1}):
        raise TariffError(f"household assigned twice from the same day: {dupes_a[0][0]}")
    return TariffFile(tuple(tariffs), tuple(assignments))


def parse_yaml(text: str) -> TariffFile:
    """Tariffs and assignments from YAML text."""
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise TariffError(f"not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or not set(doc) <= {"tariffs", "assignments"}:
        raise TariffError("the file must be a mapping with `tariffs` and/or `assignments` lists")
    tariffs = [_tariff(t, f"tariffs[{i}]") for i, t in enumerate(doc.get("tariffs") or [])]
    assignments = [
        _assignment(a, f"assignments[{i}]") for i, a in enumerate(doc.get("assignments") or [])
    ]
    return _checked(tariffs, assignments)


def parse_csv(text: str) -> TariffFile:
    """Tariff bands or assignments from CSV text, told apart by the header."""
    rows = list(csv.DictReader(io.StringIO(text)))
    header = set(rows[0]) if rows else set()
    if {"tariff_id", "currency", "start", "end", "price_per_kwh"} <= header:
        grouped: dict[str, dict] = {}
        for i, row in enumerate(rows, start=2):
            tid = _text(row.get("tariff_id"), f"line {i}: tariff_id")
            t = grouped.setdefault(tid, {"id": tid, "currency": row["currency"], "bands": []})
            if str(row["currency"]).strip().upper() != str(t["currency"]).strip().upper():
                raise TariffError(f"line {i}: tariff {tid} has two currencies")
            t["default"] = t.get("default") or _bool(row.get("default"), f"line {i}: default")
            t["bands"].append(row)
        tariffs = [_tariff(t, f"tariff {tid}") for tid, t in grouped.items()]
        return _checked(tariffs, [])
    if {"household_id", "tariff_id"} <= header:
        return _checked([], [_assignment(r, f"line {i}") for i, r in enumerate(rows, start=2)])
    raise TariffError(
        "CSV header must be tariff_id,currency,start,end,price_per_kwh[,default] (bands) or "
        "household_id,tariff_id[,valid_from] (assignments)"
    )


def load(path: Path) -> TariffFile:
    """Parse a .yaml/.yml or .csv tariff file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        return parse_yaml(text)
    if path.suffix.lower() == ".csv":
        return parse_csv(text)
    raise TariffError(f"{path.name}: expected a .yaml, .yml or .csv file")


def _time_text(minute: int) -> str:
    # As text: PostgreSQL's time type holds 24:00, Python's does not.
    return f"{minute // 60:02d}:{minute % 60:02d}"


def apply(conn: psycopg.Connection, parsed: TariffFile) -> dict[str, int]:
    """Write the tariffs (their bands replaced) and assignments in one transaction."""
    with conn.transaction(), conn.cursor() as cur:
        if any(t.is_default for t in parsed.tariffs):
            cur.execute("UPDATE energy.tariffs SET is_default = false WHERE is_default")
        for t in parsed.tariffs:
            cur.execute(
                "INSERT INTO energy.tariffs (tariff_id, currency, is_default) VALUES (%s, %s, %s) "
                "ON CONFLICT (tariff_id) DO UPDATE SET currency = EXCLUDED.currency, "
                "is_default = EXCLUDED.is_default, updated_at = now()",
                (t.tariff_id, t.currency, t.is_default),
            )
            cur.execute("DELETE FROM energy.tariff_bands WHERE tariff_id = %s", (t.tariff_id,))
            cur.executemany(
                "INSERT INTO energy.tariff_bands (tariff_id, start_time, end_time, price_per_kwh) "
                "VALUES (%s, %s::time, %s::time, %s)",
                [
                    (
                        t.tariff_id,
                        _time_text(b.start_minute),
                        _time_text(b.end_minute),
                        b.price_per_kwh,
                    )
                    for b in t.bands
                ],
            )
        known = {r[0] for r in cur.execute("SELECT tariff_id FROM energy.tariffs").fetchall()}
        if unknown := sorted({a.tariff_id for a in parsed.assignments} - known):
            raise TariffError(f"assignments name unknown tariffs: {', '.join(unknown)}")
        cur.executemany(
            "INSERT INTO energy.household_tariffs (household_id, valid_from, tariff_id) "
            "VALUES (%s, %s, %s) ON CONFLICT (household_id, valid_from) "
            "DO UPDATE SET tariff_id = EXCLUDED.tariff_id",
            [(a.household_id, a.valid_from, a.tariff_id) for a in parsed.assignments],
        )
    return {"tariffs": len(parsed.tariffs), "assignments": len(parsed.assignments)}
