"""`fresh_as_of` gets a row for the daily reports.

The view (0005) named the rollup tables and the quarantine. A dashboard over
`household_daily_report` (0007) has the same question: which is the newest day reported, and
when was it generated. Its ledger is `report_days`, one row per day generated for every
household. The newest bucket of that row is the newest report day at UTC midnight, with a grain of
one day; each household's report covers its own local day, so `fresh_through` is only as exact as
a day. `missing_24h` counts days, so it is 0 unless the newest day itself is missing.

The rows of 0005 stay as they are, in a view of their own that only the owner reads
(`fresh_as_of` reads it with the owner's rights); `fresh_as_of` is that view plus the report row.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-29
"""

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

UPGRADE = """
SET LOCAL ROLE energy_owner;

ALTER VIEW energy.fresh_as_of RENAME TO rollup_freshness;
REVOKE ALL ON energy.rollup_freshness FROM bi_reader, energy_writer;

CREATE VIEW energy.fresh_as_of AS
SELECT * FROM energy.rollup_freshness
UNION ALL
SELECT 'household_daily_report'::text,
       interval '1 day',
       newest.bucket,
       newest.bucket + interval '1 day',
       newest.generated_at,
       now() - (newest.bucket + interval '1 day'),
       CASE WHEN newest.bucket IS NULL THEN NULL ELSE 0 END
FROM (SELECT NULL::int) one
LEFT JOIN LATERAL (SELECT day::timestamp AT TIME ZONE 'UTC' AS bucket, generated_at
                   FROM energy.report_days ORDER BY day DESC LIMIT 1) newest ON true;

GRANT SELECT ON energy.fresh_as_of TO bi_reader;

RESET ROLE;
"""

DOWNGRADE = """
SET LOCAL ROLE energy_owner;
DROP VIEW energy.fresh_as_of;
ALTER VIEW energy.rollup_freshness RENAME TO fresh_as_of;
GRANT SELECT ON energy.fresh_as_of TO bi_reader;
RESET ROLE;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
