"""The rollup tables' contract, checked per window before alerts trust them: the columns as
migrated (schema drift) and no impossible aggregates (min above max, a mean outside min..max,
negative counts or energy, a mean without samples). No Dagster here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import psycopg

_TEXT, _TS, _INT, _FLOAT = "text", "timestamp with time zone", "integer", "double precision"
COLUMNS = {
    "device_rollup_1m": {
        "device_id": _TEXT,
        "bucket": _TS,
        "household_id": _TEXT,
        "sample_count": _INT,
        "power_w_avg": _FLOAT,
        "power_w_min": _FLOAT,
        "power_w_max": _FLOAT,
        "energy_wh_sum": _FLOAT,
        "rejected_count": _INT,
        "voltage_v_avg": _FLOAT,
        "voltage_v_min": _FLOAT,
        "voltage_v_max": _FLOAT,
        "computed_at": _TS,
    },
    "household_rollup_5m": {
        "household_id": _TEXT,
        "bucket": _TS,
        "device_count": _INT,
        "sample_count": _INT,
        "energy_wh_sum": _FLOAT,
        "power_w_avg": _FLOAT,
        "power_w_peak": _FLOAT,
        "computed_at": _TS,
    },
}
# Means are computed from the same values as min and max; a relative slack covers rounding.
_ABOVE = "{a} > {b} + 1e-9 * abs({b}) + 1e-9"
_IMPOSSIBLE = {
    "device_rollup_1m": " OR ".join(
        [
            _ABOVE.format(a="r.power_w_min", b="r.power_w_max"),
            _ABOVE.format(a="r.power_w_min", b="r.power_w_avg"),
            _ABOVE.format(a="r.power_w_avg", b="r.power_w_max"),
            _ABOVE.format(a="r.voltage_v_min", b="r.voltage_v_max"),
            "r.sample_count < 0",
            "r.rejected_count < 0",
            "r.energy_wh_sum < 0",
            "(r.sample_count = 0 AND r.power_w_avg IS NOT NULL)",
        ]
    ),
    "household_rollup_5m": " OR ".join(
        [
            _ABOVE.format(a="r.power_w_avg", b="r.power_w_peak"),
            "r.power_w_avg < 0",
            "r.device_count < 0",
            "r.sample_count < 0",
            "r.energy_wh_sum < 0",
        ]
    ),
}
_KEY = {"device_rollup_1m": "device_id", "household_rollup_5m": "household_id"}
MAX_EXAMPLES = 5


@dataclass(frozen=True)
class ContractResult:
    """One window's verdict: rows read, rows breaking the contract (a few of their ids)."""

    bucket: datetime
    rows: int
    violations: int
    examples: list[str] = field(default_factory=list)
    schema_problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.violations == 0 and not self.schema_problems

    def __str__(self) -> str:
        parts = [f"{self.violations} of {self.rows} rows impossible"]
        if self.examples:
            parts.append(f"e.g. {', '.join(self.examples)}")
        return "; ".join(parts + self.schema_problems)


def schema_problems(conn: psycopg.Connection, table: str) -> list[str]:
    """Columns the contract needs that are missing or of another type."""
    found: dict[str, str] = dict(
        conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'energy' AND table_name = %s",
            (table,),
        ).fetchall()
    )
    problems = []
    for column, kind in COLUMNS[table].items():
        if column not in found:
            problems.append(f"column {column} is missing")
        elif found[column] != kind:
            problems.append(f"column {column} is {found[column]}, expected {kind}")
    return problems


def check_contract(
    conn: psycopg.Connection, table: str, buckets: Sequence[datetime], step: timedelta
) -> list[ContractResult]:
    """The contract of `energy.<table>` for each window starting at one of `buckets`."""
    problems = schema_problems(conn, table)
    if problems:
        return [ContractResult(b, 0, 0, schema_problems=problems) for b in buckets]
    rows = conn.execute(
        f"""
        SELECT w.bucket, count(r.bucket),
               count(r.bucket) FILTER (WHERE {_IMPOSSIBLE[table]}),
               (array_agg(r.{_KEY[table]} ORDER BY r.{_KEY[table]})
                    FILTER (WHERE {_IMPOSSIBLE[table]}))[1:{MAX_EXAMPLES}]
        FROM unnest(%(buckets)s::timestamptz[]) AS w(bucket)
        LEFT JOIN energy.{table} r ON r.bucket = w.bucket
            AND r.bucket >= %(first)s AND r.bucket < %(end)s
        GROUP BY w.bucket ORDER BY w.bucket
        """,
        {"buckets": list(buckets), "first": min(buckets), "end": max(buckets) + step},
    ).fetchall()
    return [ContractResult(b, n, bad, list(ex or [])) for b, n, bad, ex in rows]
