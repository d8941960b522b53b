"""Index-only reads for the BI queries on the minute and 5-minute tables.

A dashboard asking for one device over a day reads 1,440 minute rows. Rows are written minute by
minute for every device at once, so one device's rows sit on 1,440 different heap pages, and each
query touched all of them (about 13 ms from disk cache, 1.3 ms from shared buffers). The primary
keys now carry the columns dashboards read (INCLUDE), so the same answer comes from a dozen
contiguous index pages without visiting the heap (figures in docs/benchmark.md). The 5-minute
household table gets the same treatment; the hourly table's household index already covered the
top-devices query (0004).

An index-only scan skips the heap only for pages the visibility map marks all-visible, which
autovacuum maintains (PostgreSQL 13+ also vacuums insert-only tables); rows written since a
partition's last vacuum still cost a heap visit each.

Rebuilding a primary key locks the table while its indexes are built: on a large existing
deployment, run this migration in a quiet hour (about a minute per 10 million rows here).

Revision ID: 0009
Revises: 0005
Create Date: 2026-11-28
"""

from alembic import op

revision = "0009"
down_revision = "0005"
branch_labels = ("read_paths",)
depends_on = None

UPGRADE = r"""
SET LOCAL ROLE energy_owner;

ALTER TABLE energy.device_rollup_1m
    DROP CONSTRAINT device_rollup_1m_pkey,
    ADD CONSTRAINT device_rollup_1m_pkey PRIMARY KEY (device_id, bucket)
        INCLUDE (sample_count, power_w_avg, power_w_min, power_w_max, energy_wh_sum);

ALTER TABLE energy.household_rollup_5m
    DROP CONSTRAINT household_rollup_5m_pkey,
    ADD CONSTRAINT household_rollup_5m_pkey PRIMARY KEY (household_id, bucket)
        INCLUDE (device_count, sample_count, energy_wh_sum, power_w_avg, power_w_peak);

RESET ROLE;
"""

DOWNGRADE = r"""
SET LOCAL ROLE energy_owner;

ALTER TABLE energy.device_rollup_1m
    DROP CONSTRAINT device_rollup_1m_pkey,
    ADD CONSTRAINT device_rollup_1m_pkey PRIMARY KEY (device_id, bucket);

ALTER TABLE energy.household_rollup_5m
    DROP CONSTRAINT household_rollup_5m_pkey,
    ADD CONSTRAINT household_rollup_5m_pkey PRIMARY KEY (household_id, bucket);

RESET ROLE;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
