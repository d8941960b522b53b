"""Rollup partitions are vacuumed every thousand new rows, so BI reads stay off the heap.

The BI reads of the rollup tables are index-only scans (0004, 0009), which skip the heap only for
pages the visibility map marks all-visible; only VACUUM sets that mark. With the server defaults,
autovacuum vacuums a table once 1,000 rows + 20 % of its size have been inserted since its last
vacuum. A day partition of the minute table grows by 5,000 rows a minute at 5,000 devices, so by
evening up to about four hours of its rows wait for the next vacuum. Once the day is over its
inserts stop, and the rows written since its last vacuum are not vacuumed again until a
wraparound vacuum. Each such row costs the index-only scan a visit to its own heap page: a device's
day with 781 of its 1,381 rows unvacuumed took 1.26 ms of backend CPU instead of 0.84 ms
(prepared statement, docs/benchmark.md, reads).

A scale factor of 0 makes autovacuum vacuum each partition of the three rollup tables once a
thousand rows have arrived since its last vacuum, so only about the last minute of rows (one
`autovacuum_naptime`) is outside the visibility map, and a finished day ends vacuumed when the
fleet writes a thousand rows a minute or more. Such a vacuum visits only the pages not yet
all-visible: about 30 ms for a minute of 2,000 devices here.

Partitions do not inherit storage parameters from the parent (PostgreSQL refuses them on a
partitioned table), so `energy.ensure_day_partitions` now sets them on each partition it creates,
before attaching it; the existing partitions get them here.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-28
"""

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

TABLES = ("device_rollup_1m", "household_rollup_5m", "device_rollup_1h")
SETTINGS = "autovacuum_vacuum_insert_threshold = 1000, autovacuum_vacuum_insert_scale_factor = 0"
RESET = "autovacuum_vacuum_insert_threshold, autovacuum_vacuum_insert_scale_factor"
_TABLE_LIST = ", ".join(f"'{t}'" for t in TABLES)

# The 0003 function; __STORAGE__ sets the parameters on a new partition of a rollup table.
FUNCTION = r"""
CREATE OR REPLACE FUNCTION energy.ensure_day_partitions(parent regclass, from_day date, to_day date)
RETURNS integer LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    d date;
    part text;
    created integer := 0;
    parent_name text;
BEGIN
    SELECT c.relname INTO parent_name
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = parent AND n.nspname = 'energy' AND c.relkind = 'p';
    IF parent_name IS NULL THEN
        RAISE EXCEPTION '% is not a partitioned table of schema energy', parent;
    END IF;
    IF to_day - from_day > 400 THEN
        RAISE EXCEPTION 'refusing to create % day partitions at once', to_day - from_day + 1;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('energy.ensure_day_partitions'));
    d := from_day;
    WHILE d <= to_day LOOP
        part := format('%s_p%s', parent_name, to_char(d, 'YYYYMMDD'));
        IF to_regclass(format('energy.%I', part)) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE energy.%I (LIKE energy.%I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                part, parent_name);
__STORAGE__
            EXECUTE format(
                'ALTER TABLE energy.%I ATTACH PARTITION energy.%I FOR VALUES FROM (%L) TO (%L)',
                parent_name, part,
                (d::timestamp AT TIME ZONE 'UTC'), ((d + 1)::timestamp AT TIME ZONE 'UTC'));
            created := created + 1;
        END IF;
        d := d + 1;
    END LOOP;
    RETURN created;
END $$;
"""

STORAGE = r"""
            IF parent_name IN (__TABLES__) THEN
                EXECUTE format('ALTER TABLE energy.%I SET (__SETTINGS__)', part);
            END IF;"""

# ALTER TABLE ... SET takes SHARE UPDATE EXCLUSIVE on each partition: readers and writers go on.
EXISTING = r"""
DO $$
DECLARE
    part regclass;
BEGIN
    FOR part IN
        SELECT i.inhrelid::regclass
        FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
        JOIN pg_namespace n ON n.oid = p.relnamespace
        WHERE n.nspname = 'energy' AND p.relname IN (__TABLES__)
    LOOP
        EXECUTE format('ALTER TABLE %s __ACTION__', part);
    END LOOP;
END $$;
"""


def _sql(template: str, action: str = "", storage: bool = True) -> str:
    return (
        template.replace("__STORAGE__\n", STORAGE.lstrip("\n") + "\n" if storage else "")
        .replace("__TABLES__", _TABLE_LIST)
        .replace("__SETTINGS__", SETTINGS)
        .replace("__ACTION__", action)
    )


def upgrade() -> None:
    op.execute("SET LOCAL ROLE energy_owner")
    op.execute(_sql(FUNCTION))
    op.execute(_sql(EXISTING, f"SET ({SETTINGS})"))
    op.execute("RESET ROLE")


def downgrade() -> None:
    op.execute("SET LOCAL ROLE energy_owner")
    # The same function without the storage parameters, as 0003 defined it.
    op.execute(_sql(FUNCTION, storage=False))
    op.execute(_sql(EXISTING, f"RESET ({RESET})"))
    op.execute("RESET ROLE")
