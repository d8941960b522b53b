"""Device metadata, per-device minute rollups (partitioned by day), quarantine and minute ledger.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UPGRADE = r"""
CREATE TABLE energy.devices (
    device_id     text PRIMARY KEY CHECK (device_id <> ''),
    household_id  text NOT NULL CHECK (household_id <> ''),
    name          text,
    model         text,
    location      text,
    timezone      text NOT NULL DEFAULT 'UTC',
    profile       text,
    registered_at timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX devices_household_idx ON energy.devices (household_id);

CREATE TABLE energy.device_rollup_1m (
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
-- Window replacement deletes by bucket; household reads stay index-only through the INCLUDE list.
CREATE INDEX device_rollup_1m_bucket_idx ON energy.device_rollup_1m (bucket);
CREATE INDEX device_rollup_1m_household_idx ON energy.device_rollup_1m (household_id, bucket)
    INCLUDE (device_id, energy_wh_sum, power_w_avg, power_w_max);

-- Creates the missing day partitions of a table partitioned by a timestamptz range, for the UTC
-- days from_day .. to_day inclusive. Serialised by an advisory lock so concurrent writers agree.
CREATE FUNCTION energy.ensure_day_partitions(parent regclass, from_day date, to_day date)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    d date;
    part text;
    created integer := 0;
    parent_name text := (SELECT relname FROM pg_class WHERE oid = parent);
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('energy.ensure_day_partitions'));
    d := from_day;
    WHILE d <= to_day LOOP
        part := format('%s_p%s', parent_name, to_char(d, 'YYYYMMDD'));
        IF to_regclass(format('energy.%I', part)) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE energy.%I PARTITION OF %s FOR VALUES FROM (%L) TO (%L)',
                part, parent,
                (d::timestamp AT TIME ZONE 'UTC'), ((d + 1)::timestamp AT TIME ZONE 'UTC'));
            created := created + 1;
        END IF;
        d := d + 1;
    END LOOP;
    RETURN created;
END $$;

SELECT energy.ensure_day_partitions(
    'energy.device_rollup_1m', (now() AT TIME ZONE 'UTC')::date - 1,
    (now() AT TIME ZONE 'UTC')::date + 7);

CREATE TABLE energy.quarantine (
    quarantine_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source         text NOT NULL,
    bucket         timestamptz NOT NULL,
    point_time_ns  bigint,
    device_id      text,
    household_id   text,
    power_w        double precision,
    energy_wh      double precision,
    voltage_v      double precision,
    reason         text NOT NULL,
    quarantined_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX quarantine_source_bucket_idx ON energy.quarantine (source, bucket);

-- One row per rolled-up minute: what was read, so late points can be noticed by their counts.
CREATE TABLE energy.rollup_minutes (
    bucket              timestamptz PRIMARY KEY,
    points_read         integer NOT NULL,
    power_w_points      integer NOT NULL,
    energy_wh_points    integer NOT NULL,
    duplicates_dropped  integer NOT NULL,
    rejected            integer NOT NULL,
    devices             integer NOT NULL,
    late_points_ignored integer NOT NULL DEFAULT 0,
    computed_at         timestamptz NOT NULL
);
"""

DOWNGRADE = """
DROP TABLE IF EXISTS energy.rollup_minutes;
DROP TABLE IF EXISTS energy.quarantine;
DROP TABLE IF EXISTS energy.device_rollup_1m;
DROP FUNCTION IF EXISTS energy.ensure_day_partitions(regclass, date, date);
DROP TABLE IF EXISTS energy.devices;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
