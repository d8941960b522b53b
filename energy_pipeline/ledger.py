"""Ledger reads that plan repairs: which minutes have no row in `energy.rollup_minutes`.

No Dagster here. The gaps are computed by PostgreSQL so a 30-day window (43,200 minutes) costs one
index probe per minute on the server and returns only the ranges, not every bucket.
"""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg

from energy_pipeline.planning import Range

# Missing minutes of the window, grouped into islands of consecutive minutes (a minute minus its
# rank is constant along an island), newest island first.
LEDGER_GAPS_SQL = """
SELECT min(m), max(m)
FROM (
    SELECT m, m - row_number() OVER (ORDER BY m) * interval '1 minute' AS island
    FROM generate_series(%(first)s::timestamptz, %(last)s::timestamptz, interval '1 minute') AS m
    WHERE NOT EXISTS (SELECT 1 FROM energy.rollup_minutes r WHERE r.bucket = m)
) AS missing
GROUP BY island
ORDER BY 1 DESC
"""


def ledger_gaps_between(conn: psycopg.Connection, first: datetime, last: datetime) -> list[Range]:
    """Inclusive ranges of minutes in first..last without a ledger row, newest first."""
    with conn.cursor() as cur:
        cur.execute(LEDGER_GAPS_SQL, {"first": first, "last": last})
        return [(a.astimezone(UTC), b.astimezone(UTC)) for a, b in cur.fetchall()]
