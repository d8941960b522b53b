"""Voltage in the minute rollup; per-minute checksums in the ledger; out-of-range raw points.

The ledger keeps, per minute, InfluxDB's own count and sum of every field as they were when the
minute was read. The late-data check asks InfluxDB the same question again: a changed count *or* a
changed sum (a point re-written with a corrected value) means the minute is recomputed.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

UPGRADE = r"""
ALTER TABLE energy.device_rollup_1m
    ADD COLUMN voltage_v_avg double precision,
    ADD COLUMN voltage_v_min double precision,
    ADD COLUMN voltage_v_max double precision;

ALTER TABLE energy.rollup_minutes
    ADD COLUMN power_w_sum      double precision NOT NULL DEFAULT 0,
    ADD COLUMN energy_wh_sum    double precision NOT NULL DEFAULT 0,
    ADD COLUMN voltage_v_points integer NOT NULL DEFAULT 0,
    ADD COLUMN voltage_v_sum    double precision NOT NULL DEFAULT 0;

-- Points stored in InfluxDB that no minute partition will ever read (a device clock far off):
-- counted by the late-data check, one row per side, so an operator can see them.
CREATE TABLE energy.raw_out_of_range (
    side       text PRIMARY KEY CHECK (side IN ('before', 'after')),
    bound      timestamptz NOT NULL,
    points     bigint NOT NULL CHECK (points >= 0),
    checked_at timestamptz NOT NULL
);
"""

DOWNGRADE = """
DROP TABLE IF EXISTS energy.raw_out_of_range;
ALTER TABLE energy.rollup_minutes
    DROP COLUMN IF EXISTS voltage_v_sum,
    DROP COLUMN IF EXISTS voltage_v_points,
    DROP COLUMN IF EXISTS energy_wh_sum,
    DROP COLUMN IF EXISTS power_w_sum;
ALTER TABLE energy.device_rollup_1m
    DROP COLUMN IF EXISTS voltage_v_max,
    DROP COLUMN IF EXISTS voltage_v_min,
    DROP COLUMN IF EXISTS voltage_v_avg;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
