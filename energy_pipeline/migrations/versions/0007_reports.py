"""Daily household reports: tariffs with their price bands, tariff assignments, the report rows
and the per-day ledger of what each report day read.

`household_daily_report` is a plain table: one row per household and local day is small (a
thousand households make 365,000 rows a year) and reports are kept forever by default
(ENERGY_RETENTION_DAILY_REPORT_DAYS=0); a positive value makes retention delete the rows of older
days in batches, so day partitions would buy nothing.

Revision ID: 0007
Revises: 0005
Create Date: 2026-11-28
"""

from alembic import op

revision = "0007"
down_revision = "0005"
branch_labels = ("reports",)
depends_on = None

UPGRADE = r"""
SET LOCAL ROLE energy_owner;

CREATE TABLE energy.tariffs (
    tariff_id  text PRIMARY KEY CHECK (tariff_id <> ''),
    currency   text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    -- Households without an assignment are priced with the default tariff (at most one).
    is_default boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX tariffs_one_default_idx ON energy.tariffs (is_default) WHERE is_default;

-- A tariff's price by local time of day: bands cover [start_time, end_time) of the household's
-- local clock, end_time '24:00' closes the day. A flat tariff has one band 00:00-24:00.
CREATE TABLE energy.tariff_bands (
    tariff_id     text NOT NULL REFERENCES energy.tariffs ON DELETE CASCADE,
    start_time    time NOT NULL,
    end_time      time NOT NULL,
    price_per_kwh numeric(12, 6) NOT NULL CHECK (price_per_kwh >= 0),
    PRIMARY KEY (tariff_id, start_time),
    CHECK (start_time < end_time)
);

-- Which tariff a household pays from a local day on; the newest assignment not after a day wins.
CREATE TABLE energy.household_tariffs (
    household_id text NOT NULL,
    valid_from   date NOT NULL,
    tariff_id    text NOT NULL REFERENCES energy.tariffs,
    PRIMARY KEY (household_id, valid_from)
);

CREATE TABLE energy.household_daily_report (
    household_id     text NOT NULL,
    day              date NOT NULL,
    timezone         text NOT NULL,
    day_start        timestamptz NOT NULL,
    day_end          timestamptz NOT NULL,
    energy_kwh       double precision NOT NULL CHECK (energy_kwh >= 0),
    peak_power_w     double precision,
    peak_at          timestamptz,
    peak_local_time  time,
    top_devices      jsonb NOT NULL DEFAULT '[]',
    trailing_avg_kwh double precision,
    change_pct       double precision,
    tariff_id        text,
    cost             numeric(14, 4),
    currency         text,
    minutes_covered  integer NOT NULL CHECK (minutes_covered >= 0),
    minutes_expected integer NOT NULL CHECK (minutes_expected BETWEEN 1380 AND 1500),
    generated_at     timestamptz NOT NULL,
    PRIMARY KEY (household_id, day)
);
CREATE INDEX household_daily_report_day_idx ON energy.household_daily_report (day);

-- One row per computed report day: the newest `computed_at` of the 5-minute windows it read
-- (its own span and the trailing week). A day is stale when that value has changed since.
CREATE TABLE energy.report_days (
    day                date PRIMARY KEY,
    households         integer NOT NULL CHECK (households >= 0),
    source_computed_at timestamptz,
    generated_at       timestamptz NOT NULL
);

CREATE VIEW energy.bi_household_daily AS
SELECT r.household_id,
       r.day,
       r.timezone,
       r.energy_kwh,
       r.peak_power_w,
       r.peak_at,
       r.peak_local_time,
       r.top_devices,
       r.trailing_avg_kwh,
       r.change_pct,
       r.tariff_id,
       r.cost,
       r.currency,
       r.minutes_covered,
       r.minutes_expected,
       r.minutes_covered::double precision / r.minutes_expected AS completeness,
       r.generated_at
FROM energy.household_daily_report r;

GRANT SELECT ON energy.tariffs, energy.tariff_bands, energy.household_tariffs,
    energy.household_daily_report, energy.report_days, energy.bi_household_daily TO bi_reader;
GRANT SELECT, INSERT, UPDATE, DELETE ON energy.tariffs, energy.tariff_bands,
    energy.household_tariffs, energy.household_daily_report, energy.report_days TO energy_writer;

RESET ROLE;
"""

DOWNGRADE = """
DROP VIEW IF EXISTS energy.bi_household_daily;
DROP TABLE IF EXISTS energy.report_days;
DROP TABLE IF EXISTS energy.household_daily_report;
DROP TABLE IF EXISTS energy.household_tariffs;
DROP TABLE IF EXISTS energy.tariff_bands;
DROP TABLE IF EXISTS energy.tariffs;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
