"""The daily household report: each household's own local day, computed in PostgreSQL from the
5-minute and hourly rollups and written to `energy.household_daily_report`. No Dagster here.

Definitions (docs/reports.md):
- A household's time zone is the one most of its registered devices have, ties broken by the
  zone's name (the `energy.bi_households` rule); unregistered households and zones PostgreSQL
  does not know are reported in UTC.
- Its local day D is [D 00:00, D+1 00:00) on that zone's clock: 1380, 1440 or 1500 minutes.
- Energy, peak, cost and coverage come from `household_rollup_5m` (5-minute windows align with
  every real zone offset); top devices from `device_rollup_1h` for the whole UTC hours inside the
  day and from `device_rollup_1m` for the partial hours at its ends (zones offset by :30 or :45).
- Coverage: the ledger minutes of each 5-minute window in which the household has samples.
- The trailing average is the mean daily energy of the previous 7 local days that hold data.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row

REPORT_TABLE = "household_daily_report"
TRAILING_DAYS = 7
# Every zone's local day D lies inside [D - 14 h, D + 1 day + 12 h) UTC: it starts first at
# UTC+14 and ends last at UTC-12. A report of day D reads nothing outside that span but its
# trailing week, the same span 7 days earlier.
SPAN_BEFORE = timedelta(hours=14)
SPAN_AFTER = timedelta(days=1, hours=12)
# Relative tolerance of the kWh check: the same doubles summed in another order.
KWH_REL_TOLERANCE = 1e-9
_ORIGIN = "2000-01-01 00:00:00+00"

# The households of a day and their local-day windows. %(households)s NULL means every one.
_WINDOWS = f"""
    zones AS (SELECT name FROM pg_timezone_names),
    seen AS (
        SELECT DISTINCT household_id FROM energy.household_rollup_5m
        WHERE bucket >= %(span_start)s AND bucket < %(span_end)s
    ),
    hh AS (
        SELECT h.household_id,
               CASE WHEN b.timezone IN (SELECT name FROM zones) THEN b.timezone ELSE 'UTC' END
                   AS tz
        FROM (SELECT household_id FROM energy.bi_households UNION SELECT household_id FROM seen) h
        LEFT JOIN energy.bi_households b USING (household_id)
        WHERE %(households)s::text[] IS NULL OR h.household_id = ANY(%(households)s::text[])
    ),
    win AS (
        SELECT household_id, tz,
               %(day)s::date::timestamp AT TIME ZONE tz AS day_start,
               (%(day)s::date + 1)::timestamp AT TIME ZONE tz AS day_end
        FROM hh
    ),
    hours AS (
        SELECT w.*,
               date_bin('1 hour', w.day_start + interval '1 hour' - interval '1 microsecond',
                        '{_ORIGIN}'::timestamptz) AS hour_start,
               date_bin('1 hour', w.day_end, '{_ORIGIN}'::timestamptz) AS hour_end
        FROM win w
    )
"""

# Float sums take their inputs in a fixed order, so a re-run writes bit-identical values.
_REPORT_SELECT = f"""
WITH {_WINDOWS},
five AS (
    SELECT w.household_id, f.bucket, f.energy_wh_sum, f.power_w_peak, f.sample_count,
           (f.bucket AT TIME ZONE w.tz)::time AS local_time
    FROM win w
    JOIN energy.household_rollup_5m f
      ON f.household_id = w.household_id AND f.bucket >= w.day_start AND f.bucket < w.day_end
),
totals AS (
    SELECT household_id, sum(energy_wh_sum ORDER BY bucket) / 1000.0 AS energy_kwh
    FROM five GROUP BY household_id
),
covered AS (
    SELECT f.household_id, sum(coalesce(rw.minutes_covered, 0))::integer AS minutes_covered
    FROM five f
    LEFT JOIN energy.rollup_windows rw
           ON rw.grain = 'household_rollup_5m' AND rw.bucket = f.bucket
    WHERE f.sample_count > 0
    GROUP BY f.household_id
),
peak AS (
    SELECT DISTINCT ON (household_id) household_id, power_w_peak, bucket AS peak_at
    FROM five WHERE power_w_peak IS NOT NULL
    ORDER BY household_id, power_w_peak DESC, bucket
),
history AS (
    -- one index range per household and previous local day (no per-row zone arithmetic)
    SELECT w.household_id, avg(d.day_kwh ORDER BY n.back DESC) AS trailing_avg_kwh
    FROM win w
    CROSS JOIN generate_series(1, {TRAILING_DAYS}) AS n(back)
    CROSS JOIN LATERAL (
        SELECT sum(f.energy_wh_sum ORDER BY f.bucket) / 1000.0 AS day_kwh
        FROM energy.household_rollup_5m f
        WHERE f.household_id = w.household_id
          AND f.bucket >= (%(day)s::date - n.back)::timestamp AT TIME ZONE w.tz
          AND f.bucket < (%(day)s::date - n.back + 1)::timestamp AT TIME ZONE w.tz
    ) d
    WHERE d.day_kwh IS NOT NULL
    GROUP BY w.household_id
),
tariff AS (
    SELECT w.household_id, t.tariff_id, t.currency
    FROM win w
    LEFT JOIN LATERAL (
        SELECT a.tariff_id FROM energy.household_tariffs a
        WHERE a.household_id = w.household_id AND a.valid_from <= %(day)s::date
        ORDER BY a.valid_from DESC LIMIT 1
    ) assigned ON true
    JOIN energy.tariffs t
      ON t.tariff_id = coalesce(assigned.tariff_id,
                                (SELECT tariff_id FROM energy.tariffs WHERE is_default))
),
priced AS (
    -- Each 5-minute window priced by the band holding its local start time. A window no band
    -- holds makes the day's cost unknown (NULL) rather than too low.
    SELECT f.household_id,
           sum(f.energy_wh_sum::numeric / 1000 * b.price_per_kwh) AS cost,
           count(*) FILTER (WHERE b.tariff_id IS NULL) AS unpriced
    FROM five f
    JOIN tariff t USING (household_id)
    LEFT JOIN energy.tariff_bands b
           ON b.tariff_id = t.tariff_id AND f.local_time >= b.start_time
          AND f.local_time < b.end_time
    GROUP BY f.household_id
),
device_energy AS (
    SELECT h.household_id, d.device_id, sum(d.energy_wh_sum ORDER BY d.bucket) AS energy_wh
    FROM hours h
    JOIN energy.device_rollup_1h d
      ON d.household_id = h.household_id AND d.bucket >= h.hour_start AND d.bucket < h.hour_end
    GROUP BY 1, 2
    UNION ALL
    SELECT h.household_id, m.device_id, sum(m.energy_wh_sum ORDER BY m.bucket)
    FROM hours h
    -- the partial hours at both ends: two plain ranges, each an index range scan
    CROSS JOIN LATERAL (VALUES (h.day_start, h.hour_start), (h.hour_end, h.day_end)) AS e(lo, hi)
    JOIN energy.device_rollup_1m m
      ON m.household_id = h.household_id AND m.bucket >= e.lo AND m.bucket < e.hi
    WHERE e.lo < e.hi
    GROUP BY 1, 2
),
ranked AS (
    SELECT household_id, device_id, sum(energy_wh ORDER BY energy_wh) / 1000.0 AS kwh,
           row_number() OVER (PARTITION BY household_id
                              ORDER BY sum(energy_wh ORDER BY energy_wh) DESC, device_id) AS rank
    FROM device_energy GROUP BY household_id, device_id
),
top AS (
    SELECT r.household_id,
           jsonb_agg(jsonb_build_object(
               'device_id', r.device_id, 'name', dv.name, 'energy_kwh', r.kwh,
               'share', CASE WHEN e.energy_kwh > 0 THEN r.kwh / e.energy_kwh END)
               ORDER BY r.rank) AS top_devices
    FROM ranked r
    LEFT JOIN energy.devices dv ON dv.device_id = r.device_id
    LEFT JOIN totals e ON e.household_id = r.household_id
    WHERE r.rank <= 3 AND r.kwh > 0
    GROUP BY r.household_id
)
SELECT w.household_id, %(day)s::date AS day, w.tz AS timezone, w.day_start, w.day_end,
       coalesce(e.energy_kwh, 0) AS energy_kwh,
       p.power_w_peak AS peak_power_w, p.peak_at, (p.peak_at AT TIME ZONE w.tz)::time AS
       peak_local_time,
       coalesce(tp.top_devices, '[]'::jsonb) AS top_devices,
       hi.trailing_avg_kwh,
       CASE WHEN hi.trailing_avg_kwh > 0
            THEN 100 * (coalesce(e.energy_kwh, 0) - hi.trailing_avg_kwh) / hi.trailing_avg_kwh
       END AS change_pct,
       t.tariff_id,
       CASE WHEN t.tariff_id IS NULL OR coalesce(pr.unpriced, 0) > 0 THEN NULL
            ELSE round(coalesce(pr.cost, 0), 4) END AS cost,
       t.currency,
       coalesce(c.minutes_covered, 0) AS minutes_covered,
       (extract(epoch FROM w.day_end - w.day_start) / 60)::integer AS minutes_expected,
       %(generated_at)s::timestamptz AS generated_at
FROM win w
LEFT JOIN totals e USING (household_id)
LEFT JOIN covered c USING (household_id)
LEFT JOIN peak p USING (household_id)
LEFT JOIN history hi USING (household_id)
LEFT JOIN tariff t USING (household_id)
LEFT JOIN priced pr USING (household_id)
LEFT JOIN top tp USING (household_id)
"""

REPORT_COLUMNS = (
    "household_id",
    "day",
    "timezone",
    "day_start",
    "day_end",
    "energy_kwh",
    "peak_power_w",
    "peak_at",
    "peak_local_time",
    "top_devices",
    "trailing_avg_kwh",
    "change_pct",
    "tariff_id",
    "cost",
    "currency",
    "minutes_covered",
    "minutes_expected",
    "generated_at",
)

_SOURCE_STAMP = """
SELECT max(computed_at) FROM energy.rollup_windows
WHERE grain = 'household_rollup_5m' AND bucket >= %(stamp_start)s AND bucket < %(span_end)s
"""

# Households whose registered devices are in more than one zone, and zones PostgreSQL does not
# know: reported in the run's metadata.
_ZONE_NOTES = """
SELECT household_id, array_agg(DISTINCT timezone ORDER BY timezone) AS zones,
       bool_or(timezone NOT IN (SELECT name FROM pg_timezone_names)) AS unknown_zone
FROM energy.devices GROUP BY household_id
HAVING count(DISTINCT timezone) > 1
    OR bool_or(timezone NOT IN (SELECT name FROM pg_timezone_names))
ORDER BY household_id
"""

_SUM_CHECK = """
SELECT r.household_id, r.energy_kwh,
       coalesce((SELECT sum(f.energy_wh_sum) / 1000.0 FROM energy.household_rollup_5m f
                 WHERE f.household_id = r.household_id
                   AND f.bucket >= r.day_start AND f.bucket < r.day_end), 0)
FROM energy.household_daily_report r
WHERE r.day = %(day)s
ORDER BY r.household_id
"""

# Households holding 5-minute rows inside their own local day D but no report row for D.
_MISSING_CHECK = f"""
WITH {_WINDOWS}
SELECT w.household_id FROM win w
WHERE NOT EXISTS (SELECT 1 FROM energy.household_daily_report r
                  WHERE r.household_id = w.household_id AND r.day = %(day)s)
  AND EXISTS (SELECT 1 FROM energy.household_rollup_5m f
              WHERE f.household_id = w.household_id
                AND f.bucket >= w.day_start AND f.bucket < w.day_end)
ORDER BY 1
"""


@dataclass(frozen=True)
class ReportWrite:
    """What one report day's write did."""

    day: date
    households: int
    households_with_data: int
    total_kwh: float
    source_computed_at: datetime | None


@dataclass(frozen=True)
class ZoneNote:
    """A household whose devices do not agree on one known time zone."""

    household_id: str
    zones: list[str]
    unknown_zone: bool


@dataclass(frozen=True)
class KwhCheck:
    """One report row's kWh next to the sum of its 5-minute rows."""

    household_id: str
    energy_kwh: float
    five_minute_kwh: float

    @property
    def passed(self) -> bool:
        tolerance = KWH_REL_TOLERANCE * max(abs(self.five_minute_kwh), 1.0)
        return abs(self.energy_kwh - self.five_minute_kwh) <= tolerance


def day_span(day: date) -> tuple[datetime, datetime]:
    """UTC instants holding local day `day` of every zone, exactly (UTC+14 to UTC-12)."""
    midnight = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return midnight - SPAN_BEFORE, midnight + SPAN_AFTER


def source_span(day: date) -> tuple[datetime, datetime]:
    """UTC instants holding what the report of `day` reads: its day and the trailing week."""
    start, end = day_span(day)
    return start - timedelta(days=TRAILING_DAYS), end


def _params(
    day: date, households: list[str] | None = None, generated_at: datetime | None = None
) -> dict[str, Any]:
    span_start, span_end = day_span(day)
    return {
        "day": day,
        "households": households,
        "span_start": span_start,
        "span_end": span_end,
        "stamp_start": source_span(day)[0],
        "generated_at": generated_at or datetime.now(UTC),
    }


def report_lock(day: date) -> str:
    """Advisory-lock name serialising the writers of one report day."""
    return f"energy.{REPORT_TABLE}:{day.isoformat()}"


def compute_reports(
    conn: psycopg.Connection,
    day: date,
    households: list[str] | None = None,
    generated_at: datetime | None = None,
) -> list[dict[str, Any]]:
    """The report rows of local day `day` (of `households`, or every one), without storing them."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            _REPORT_SELECT + " ORDER BY w.household_id", _params(day, households, generated_at)
        )
        return cur.fetchall()


def replace_day(conn: psycopg.Connection, day: date, generated_at: datetime) -> ReportWrite:
    """Replace every report row of local day `day`, and its `report_days` row, with what the
    rollups hold now; atomically, and identically (but for `generated_at`) when re-run.

    `conn` must be in autocommit mode; the day's advisory lock is taken before the transaction
    so its snapshot follows a concurrent writer's commit (as in `hierarchy.replace_windows`).
    """
    params = _params(day, None, generated_at)
    columns = ", ".join(REPORT_COLUMNS)
    lock = report_lock(day)
    conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (lock,))
    try:
        with conn.transaction(), conn.cursor() as cur:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            cur.execute(_SOURCE_STAMP, params)
            stamp = cur.fetchone()[0]  # type: ignore[index]
            cur.execute(f"DELETE FROM energy.{REPORT_TABLE} WHERE day = %(day)s", params)
            cur.execute(
                f"INSERT INTO energy.{REPORT_TABLE} ({columns}) {_REPORT_SELECT} "
                "RETURNING energy_kwh, minutes_covered",
                params,
            )
            written = cur.fetchall()
            cur.execute(
                "INSERT INTO energy.report_days (day, households, source_computed_at, "
                "generated_at) VALUES (%s, %s, %s, %s) ON CONFLICT (day) DO UPDATE SET "
                "households = EXCLUDED.households, source_computed_at = "
                "EXCLUDED.source_computed_at, generated_at = EXCLUDED.generated_at",
                (day, len(written), stamp, generated_at),
            )
    finally:
        conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (lock,))
    return ReportWrite(
        day=day,
        households=len(written),
        households_with_data=sum(1 for _, covered in written if covered > 0),
        total_kwh=sum(kwh for kwh, _ in written),
        source_computed_at=stamp,
    )


def zone_notes(conn: psycopg.Connection) -> list[ZoneNote]:
    """Households with devices in several zones, or in a zone PostgreSQL does not know."""
    return [ZoneNote(h, list(z), bool(u)) for h, z, u in conn.execute(_ZONE_NOTES).fetchall()]


def kwh_checks(conn: psycopg.Connection, day: date) -> list[KwhCheck]:
    """Per stored report row of `day`: its kWh and the sum of its 5-minute rows now."""
    rows = conn.execute(_SUM_CHECK, {"day": day}).fetchall()
    return [KwhCheck(h, float(e), float(f)) for h, e, f in rows]


def unreported_households(conn: psycopg.Connection, day: date) -> list[str]:
    """Households with 5-minute rows in their local day `day` but no stored report row."""
    return [r[0] for r in conn.execute(_MISSING_CHECK, _params(day)).fetchall()]


def stored_report(conn: psycopg.Connection, household_id: str, day: date) -> dict[str, Any] | None:
    """The stored report row of one household and day, or None."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"SELECT {', '.join(REPORT_COLUMNS)} FROM energy.{REPORT_TABLE} "
            "WHERE household_id = %s AND day = %s",
            (household_id, day),
        )
        return cur.fetchone()


def stored_day(conn: psycopg.Connection, day: date) -> list[dict[str, Any]]:
    """Every stored report row of `day`, by household."""
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"SELECT {', '.join(REPORT_COLUMNS)} FROM energy.{REPORT_TABLE} "
            "WHERE day = %s ORDER BY household_id",
            (day,),
        )
        return cur.fetchall()
