"""Roles and grants: `energy_owner` owns the schema, `energy_writer` runs the pipeline, `bi_reader`
only reads; day partitions are created by a SECURITY DEFINER function, without locking out readers.

Roles are cluster-wide and NOLOGIN: people and services log in as their own users, made members of
one of them (see README, "Roles"). Creating the roles needs CREATEROLE the first time; later
databases of the same cluster (and concurrent migrations) find them and go on. Objects created by
later migrations belong to `energy_owner` when the migration starts with `SET LOCAL ROLE
energy_owner`; the default privileges below then grant them to the writer and the reader.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BI_STATEMENT_TIMEOUT = "30s"

UPGRADE = rf"""
-- Roles: created once per cluster. Another migration may create the same role at the same moment,
-- which shows as duplicate_object or as a unique violation on pg_authid.
DO $$
DECLARE
    r text;
    may_create boolean := (SELECT rolsuper OR rolcreaterole FROM pg_roles
                           WHERE rolname = current_user);
BEGIN
    FOREACH r IN ARRAY ARRAY['energy_owner', 'energy_writer', 'bi_reader'] LOOP
        IF to_regrole(r) IS NULL THEN
            IF NOT may_create THEN
                RAISE EXCEPTION 'role % does not exist and % may not create roles', r, current_user
                    USING HINT = 'ask a superuser to run: CREATE ROLE ' || r || ' NOLOGIN';
            END IF;
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
    END LOOP;
    -- Only honoured when a session logs in as bi_reader itself; login members get the same
    -- settings per user (README). Needs CREATEROLE, which the first run had.
    IF may_create THEN
        -- pg_db_role_setting is shared by every database of the cluster: migrations of two
        -- databases at once may set these together ("tuple concurrently updated"), and then
        -- the other one has set the same values.
        BEGIN
            ALTER ROLE bi_reader SET default_transaction_read_only = on;
            ALTER ROLE bi_reader SET statement_timeout = '{BI_STATEMENT_TIMEOUT}';
        EXCEPTION WHEN internal_error THEN
            NULL;
        END;
    END IF;
END $$;

-- The owner owns the schema and everything in it (partitions included), so that only it can
-- change the tables. Sequences of identity columns follow their table. PostgreSQL lets a
-- schema change owner only to a role with CREATE on the database.
DO $$
DECLARE
    obj record;
BEGIN
    BEGIN
        EXECUTE format('GRANT CREATE ON DATABASE %I TO energy_owner', current_database());
    EXCEPTION WHEN insufficient_privilege THEN
        RAISE NOTICE 'cannot grant CREATE on this database to energy_owner';
    END;
    IF (SELECT nspowner FROM pg_namespace WHERE nspname = 'energy') <> 'energy_owner'::regrole THEN
        ALTER SCHEMA energy OWNER TO energy_owner;
    END IF;
    FOR obj IN
        SELECT c.oid::regclass AS rel, c.relkind
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'energy' AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
          AND c.relowner <> 'energy_owner'::regrole
    LOOP
        EXECUTE format(
            'ALTER %s %s OWNER TO energy_owner',
            CASE obj.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                             WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END,
            obj.rel);
    END LOOP;
    FOR obj IN
        SELECT p.oid::regprocedure AS fn
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'energy' AND p.proowner <> 'energy_owner'::regrole
    LOOP
        EXECUTE format('ALTER ROUTINE %s OWNER TO energy_owner', obj.fn);
    END LOOP;
END $$;

-- Day partitions: a plain table LIKE the parent, then ATTACH PARTITION. ATTACH locks the parent
-- in SHARE UPDATE EXCLUSIVE mode, which open readers (ACCESS SHARE) and writers (ROW EXCLUSIVE) do
-- not conflict with; CREATE TABLE ... PARTITION OF would wait for every open reader while holding
-- ACCESS EXCLUSIVE, and queue every new reader behind it. SECURITY DEFINER lets the writer create
-- partitions without owning the table; the fixed search_path keeps callers from substituting
-- objects, and only tables of the `energy` schema qualify.
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
ALTER FUNCTION energy.ensure_day_partitions(regclass, date, date) OWNER TO energy_owner;

-- Functions are executable by PUBLIC unless revoked: a reader must not create partitions.
REVOKE ALL ON FUNCTION energy.ensure_day_partitions(regclass, date, date) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION energy.ensure_day_partitions(regclass, date, date) TO energy_writer;

REVOKE ALL ON SCHEMA energy FROM PUBLIC;
GRANT USAGE ON SCHEMA energy TO energy_writer, bi_reader;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA energy TO energy_writer;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA energy TO energy_writer;
GRANT SELECT ON ALL TABLES IN SCHEMA energy TO bi_reader;
-- The writer records migrations nowhere: the version table is the owner's alone.
REVOKE ALL ON energy.alembic_version FROM energy_writer, bi_reader;

-- Tables, views and partitions the owner creates later get the same grants.
ALTER DEFAULT PRIVILEGES FOR ROLE energy_owner IN SCHEMA energy
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO energy_writer;
ALTER DEFAULT PRIVILEGES FOR ROLE energy_owner IN SCHEMA energy
    GRANT USAGE, SELECT ON SEQUENCES TO energy_writer;
ALTER DEFAULT PRIVILEGES FOR ROLE energy_owner IN SCHEMA energy
    GRANT SELECT ON TABLES TO bi_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE energy_owner REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;

SELECT energy.ensure_day_partitions(
    'energy.device_rollup_1m', (now() AT TIME ZONE 'UTC')::date - 1,
    (now() AT TIME ZONE 'UTC')::date + 7);
"""

# Roles stay (other databases of the cluster may use them); this database's grants go.
DOWNGRADE = r"""
ALTER DEFAULT PRIVILEGES FOR ROLE energy_owner GRANT EXECUTE ON FUNCTIONS TO PUBLIC;
ALTER DEFAULT PRIVILEGES FOR ROLE energy_owner IN SCHEMA energy
    REVOKE SELECT ON TABLES FROM bi_reader;
ALTER DEFAULT PRIVILEGES FOR ROLE energy_owner IN SCHEMA energy
    REVOKE USAGE, SELECT ON SEQUENCES FROM energy_writer;
ALTER DEFAULT PRIVILEGES FOR ROLE energy_owner IN SCHEMA energy
    REVOKE SELECT, INSERT, UPDATE, DELETE ON TABLES FROM energy_writer;
REVOKE ALL ON ALL TABLES IN SCHEMA energy FROM energy_writer, bi_reader;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA energy FROM energy_writer;
REVOKE ALL ON SCHEMA energy FROM energy_writer, bi_reader;
REVOKE ALL ON FUNCTION energy.ensure_day_partitions(regclass, date, date) FROM energy_writer;
GRANT EXECUTE ON FUNCTION energy.ensure_day_partitions(regclass, date, date) TO PUBLIC;
ALTER FUNCTION energy.ensure_day_partitions(regclass, date, date) SECURITY INVOKER;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
