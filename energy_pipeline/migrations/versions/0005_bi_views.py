"""The BI contract: views joining device metadata onto each grain, and `fresh_as_of`.

The views belong to `energy_owner` and read the tables with its rights, so `bi_reader` needs
SELECT on the views only (granted below, and by the owner's default privileges). Every joined
relation is unique on its join key, so PostgreSQL removes a join whose columns a query does not
use: a view costs what its rollup table costs.

`fresh_as_of` reads the ledgers, never the rollup tables: the minute ledger `rollup_minutes` has
one row per minute rolled up (written in the same transaction as the minute's rows), and
`rollup_windows` one row per coarse window with the minutes it covered. A minute is complete when
it has a ledger row; a 5-minute or hourly window when it covered all of its expected minutes. Each
row of the view costs two short index scans of a ledger, whatever the size of the rollups.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

BI_VIEWS = (
    "bi_households",
    "bi_device_minute",
    "bi_household_5m",
    "bi_device_hour",
    "fresh_as_of",
)

# Per table: (name, bucket width, ledger query giving `bucket`, `computed_at` of complete buckets).
# `quarantine` is written with the minute rollup, in the same transaction as its ledger row.
_MINUTE_LEDGER = "SELECT bucket, computed_at FROM energy.rollup_minutes"
_FRESHNESS_SOURCES = (
    ("device_rollup_1m", "1 minute", _MINUTE_LEDGER),
    ("quarantine", "1 minute", _MINUTE_LEDGER),
    *(
        (
            grain,
            width,
            "SELECT bucket, computed_at FROM energy.rollup_windows "
            f"WHERE grain = '{grain}' AND minutes_covered >= minutes_expected",
        )
        for grain, width in (("household_rollup_5m", "5 minutes"), ("device_rollup_1h", "1 hour"))
    ),
)


def _freshness_row(table: str, width: str, ledger: str) -> str:
    # `missing_24h`: buckets of the 24 hours ending at the newest complete one that are not
    # complete, counted from the ledger's first bucket when it is younger than that.
    return f"""
SELECT '{table}'::text AS table_name,
       interval '{width}' AS grain,
       newest.bucket AS newest_bucket,
       newest.bucket + interval '{width}' AS fresh_through,
       newest.computed_at,
       now() - (newest.bucket + interval '{width}') AS lag,
       (
           SELECT (extract(epoch FROM newest.bucket - greatest(
                       newest.bucket - interval '1 day',
                       (SELECT l.bucket FROM ({ledger}) l ORDER BY l.bucket LIMIT 1)
                           - interval '{width}'))
                   / extract(epoch FROM interval '{width}'))::integer - count(*)::integer
           FROM ({ledger}) l
           WHERE l.bucket > newest.bucket - interval '1 day' AND l.bucket <= newest.bucket
       ) AS missing_24h
FROM (SELECT NULL::int) one
LEFT JOIN LATERAL (SELECT l.bucket, l.computed_at FROM ({ledger}) l
                   ORDER BY l.bucket DESC LIMIT 1) newest ON true"""


UPGRADE = rf"""
SET LOCAL ROLE energy_owner;

-- One row per household with registered devices. Its timezone is the one most of its devices
-- have (ties: the first by name), as the daily reports use.
CREATE VIEW energy.bi_households AS
SELECT household_id,
       sum(devices)::integer AS devices_registered,
       (array_agg(timezone ORDER BY devices DESC, timezone))[1] AS timezone
FROM (
    SELECT household_id, timezone, count(*) AS devices
    FROM energy.devices
    GROUP BY household_id, timezone
) per_timezone
GROUP BY household_id;

-- A registered device's household is the one used, as in the coarser rollups; the minute row
-- keeps the household tag its points carried. Every minute row belongs to a registered device
-- (points of others are quarantined), so the join is inner: a filter on household_id then
-- reaches the registry's index and the rollup's primary key, per device.
CREATE VIEW energy.bi_device_minute AS
SELECT r.bucket,
       r.device_id,
       d.household_id,
       r.household_id AS tag_household_id,
       d.name AS device_name,
       d.model AS device_model,
       d.location AS device_location,
       d.profile AS device_profile,
       d.timezone,
       r.sample_count,
       r.power_w_avg,
       r.power_w_min,
       r.power_w_max,
       r.energy_wh_sum,
       r.rejected_count,
       r.voltage_v_avg,
       r.voltage_v_min,
       r.voltage_v_max,
       r.computed_at
FROM energy.device_rollup_1m r
JOIN energy.devices d ON d.device_id = r.device_id;

CREATE VIEW energy.bi_household_5m AS
SELECT r.bucket,
       r.household_id,
       h.timezone,
       h.devices_registered,
       r.device_count,
       r.sample_count,
       r.energy_wh_sum,
       r.power_w_avg,
       r.power_w_peak,
       w.minutes_covered,
       w.minutes_expected,
       r.computed_at
FROM energy.household_rollup_5m r
LEFT JOIN energy.bi_households h ON h.household_id = r.household_id
LEFT JOIN energy.rollup_windows w
       ON w.grain = 'household_rollup_5m' AND w.bucket = r.bucket;

CREATE VIEW energy.bi_device_hour AS
SELECT r.bucket,
       r.device_id,
       r.household_id,
       d.name AS device_name,
       d.model AS device_model,
       d.location AS device_location,
       d.profile AS device_profile,
       d.timezone,
       r.sample_count,
       r.power_w_avg,
       r.power_w_min,
       r.power_w_max,
       r.energy_wh_sum,
       r.rejected_count,
       w.minutes_covered,
       w.minutes_expected,
       r.computed_at
FROM energy.device_rollup_1h r
LEFT JOIN energy.devices d ON d.device_id = r.device_id
LEFT JOIN energy.rollup_windows w
       ON w.grain = 'device_rollup_1h' AND w.bucket = r.bucket;

CREATE VIEW energy.fresh_as_of AS
{" UNION ALL".join(_freshness_row(*source) for source in _FRESHNESS_SOURCES)};

-- The owner's default privileges grant these too; said here so the contract does not depend on
-- how the database was set up.
GRANT SELECT ON {", ".join(f"energy.{v}" for v in BI_VIEWS)} TO bi_reader;

RESET ROLE;
"""

DOWNGRADE = "\n".join(f"DROP VIEW IF EXISTS energy.{v};" for v in reversed(BI_VIEWS))


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
