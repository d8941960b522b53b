"""Coarser rollups: household × 5 minutes and device × hour, day-partitioned, with their ledger.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UPGRADE = r"""
SET LOCAL ROLE energy_owner;

CREATE TABLE energy.household_rollup_5m (
    household_id  text NOT NULL,
    bucket        timestamptz NOT NULL,
    device_count  integer NOT NULL CHECK (device_count >= 0),
    sample_count  integer NOT NULL CHECK (sample_count >= 0),
    energy_wh_sum double precision NOT NULL CHECK (energy_wh_sum >= 0),
    power_w_avg   double precision,
    power_w_peak  double precision,
    computed_at   timestamptz NOT NULL,
    PRIMARY KEY (household_id, bucket)
) PARTITION BY RANGE (bucket);
CREATE INDEX household_rollup_5m_bucket_idx ON energy.household_rollup_5m (bucket);

CREATE TABLE energy.device_rollup_1h (
    device_id      text NOT NULL,
    bucket         timestamptz NOT NULL,
    household_id   text NOT NULL,
    sample_count   integer NOT NULL CHECK (sample_count >= 0),
    power_w_avg    double precision,
    power_w_min    double precision,
    power_w_max    double precision,
    energy_wh_sum  double precision NOT NULL CHECK (energy_wh_sum >= 0),
    rejected_count integer NOT NULL DEFAULT 0 CHECK (rejected_count >= 0),
    computed_at    timestamptz NOT NULL,
    PRIMARY KEY (device_id, bucket)
) PARTITION BY RANGE (bucket);
CREATE INDEX device_rollup_1h_bucket_idx ON energy.device_rollup_1h (bucket);
-- Top devices of a household over a day: index-only through the INCLUDE list.
CREATE INDEX device_rollup_1h_household_idx ON energy.device_rollup_1h (household_id, bucket)
    INCLUDE (device_id, energy_wh_sum, power_w_max);

-- One row per computed window of a coarser grain: how many of its minutes had a ledger row.
CREATE TABLE energy.rollup_windows (
    grain           text NOT NULL CHECK (grain IN ('household_rollup_5m', 'device_rollup_1h')),
    bucket          timestamptz NOT NULL,
    minutes_covered integer NOT NULL CHECK (minutes_covered >= 0),
    minutes_expected integer NOT NULL CHECK (minutes_expected > 0),
    -- Newest computed_at among the window's ledger rows the computation read (NULL: none). A
    -- window is stale exactly when the ledger's newest computed_at differs from this value.
    source_computed_at timestamptz,
    computed_at     timestamptz NOT NULL,
    PRIMARY KEY (grain, bucket)
);

SELECT energy.ensure_day_partitions(
    'energy.household_rollup_5m', (now() AT TIME ZONE 'UTC')::date - 1,
    (now() AT TIME ZONE 'UTC')::date + 7);
SELECT energy.ensure_day_partitions(
    'energy.device_rollup_1h', (now() AT TIME ZONE 'UTC')::date - 1,
    (now() AT TIME ZONE 'UTC')::date + 7);

RESET ROLE;
"""

DOWNGRADE = """
DROP TABLE IF EXISTS energy.rollup_windows;
DROP TABLE IF EXISTS energy.device_rollup_1h;
DROP TABLE IF EXISTS energy.household_rollup_5m;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
