"""Which household a device belonged to, and since when.

The 5-minute household and hourly device rollups took each minute's household from the registry
as it is now. When a device moved household, a recompute of an old window (a late point of
another device, a backfill) moved that window's share of the device to the new household while
the windows around it stayed with the old one. `device_households` keeps every registration with
the time it took effect, and the rollups take the household the device had at each minute.

A trigger on `energy.devices` keeps it: a device's first registration holds from the epoch
(1970-01-01; its points before it was registered belong to that household too; `-infinity` would
be exact, but Python's datetime cannot hold it), a change of household from the time of the
change. A move dated in the past is one more row, written by hand.

Also a partial index on the quarantine's unknown-device rows: the late-data sensor looks for
those of devices registered since, every tick.

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-29
"""

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

UPGRADE = """
SET LOCAL ROLE energy_owner;

CREATE TABLE energy.device_households (
    device_id     text NOT NULL,
    household_id  text NOT NULL,
    valid_from    timestamptz NOT NULL,
    PRIMARY KEY (device_id, valid_from)
);

INSERT INTO energy.device_households (device_id, household_id, valid_from)
SELECT device_id, household_id, 'epoch' FROM energy.devices;

CREATE FUNCTION energy.record_device_household() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.household_id IS NOT DISTINCT FROM NEW.household_id THEN
        RETURN NULL;
    END IF;
    INSERT INTO energy.device_households AS h (device_id, household_id, valid_from)
    SELECT NEW.device_id, NEW.household_id,
           CASE WHEN EXISTS (SELECT FROM energy.device_households
                             WHERE device_id = NEW.device_id)
                THEN now() ELSE 'epoch' END
    ON CONFLICT (device_id, valid_from) DO UPDATE SET household_id = EXCLUDED.household_id;
    RETURN NULL;
END;
$$;

CREATE TRIGGER devices_household_history
AFTER INSERT OR UPDATE OF household_id ON energy.devices
FOR EACH ROW EXECUTE FUNCTION energy.record_device_household();

CREATE INDEX quarantine_unknown_device_idx ON energy.quarantine (bucket)
    WHERE source = 'device_rollup_1m' AND reason LIKE '%device_id: unknown device%';

RESET ROLE;
"""

DOWNGRADE = """
DROP INDEX IF EXISTS energy.quarantine_unknown_device_idx;
DROP TRIGGER IF EXISTS devices_household_history ON energy.devices;
DROP FUNCTION IF EXISTS energy.record_device_household();
DROP TABLE IF EXISTS energy.device_households;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
