"""Least privilege: the owner migrates, the writer writes minutes (partitions included) and
cannot change the schema, `bi_reader` only reads, read-only and with a statement timeout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import psycopg
import pytest
from psycopg import errors, sql

from energy_pipeline.devtools.services import LocalPostgres, free_port
from energy_pipeline.migrations import upgrade
from energy_pipeline.storage import connect, replace_minutes, upsert_devices
from energy_pipeline_tests.helpers import BI_LOGIN_SQL, as_user, member_of
from energy_pipeline_tests.test_partitions import day_start, minute_frames


def write(dsn: str, minute: datetime) -> None:
    with connect(dsn) as conn:
        replace_minutes(
            conn, minute, minute + timedelta(minutes=1), *minute_frames(minute), datetime.now(UTC)
        )


def test_roles_exist_and_own_the_schema(pg_dsn):
    with psycopg.connect(pg_dsn) as conn:
        roles = conn.execute(
            "SELECT rolname, rolcanlogin FROM pg_roles "
            "WHERE rolname IN ('energy_owner', 'energy_writer', 'bi_reader') ORDER BY rolname"
        ).fetchall()
        owners = conn.execute(
            "SELECT DISTINCT pg_get_userbyid(c.relowner) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'energy' AND c.relkind IN ('r', 'p')"
        ).fetchall()
        definer = conn.execute(
            "SELECT prosecdef, proconfig FROM pg_proc WHERE proname = 'ensure_day_partitions'"
        ).fetchone()
    assert roles == [("bi_reader", False), ("energy_owner", False), ("energy_writer", False)]
    assert owners == [("energy_owner",)]
    assert definer[0] is True and "search_path=pg_catalog, pg_temp" in definer[1]


def test_writer_writes_minutes_and_creates_partitions_but_cannot_change_the_schema(pg_dsn, logins):
    upgrade(pg_dsn)  # as `migrate` leaves a database: TEMPORARY for the pipeline's roles only
    dsn = as_user(pg_dsn, logins("writer", member_of("energy_writer")))
    # Device imports stage their rows in a temporary table.
    with connect(dsn) as conn:
        upsert_devices(conn, pl.DataFrame({"device_id": ["dev-temp"], "household_id": ["hh-temp"]}))
    write(dsn, day_start(0) + timedelta(minutes=3))
    new_day = day_start(20)
    write(dsn, new_day)  # day +20 has no partition yet: created through the definer function
    write(dsn, new_day)  # and re-run
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM energy.device_rollup_1m").fetchone()[0] == 2
        owner = conn.execute(
            "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = %s::regclass",
            (f"energy.device_rollup_1m_p{new_day:%Y%m%d}",),
        ).fetchone()[0]
    assert owner == "energy_owner"
    forbidden = [
        "DROP TABLE energy.quarantine",
        "ALTER TABLE energy.devices ADD COLUMN x integer",
        "CREATE TABLE energy.x (a integer)",
        "TRUNCATE energy.device_rollup_1m",
        "CREATE TABLE energy.device_rollup_1m_p20991231 PARTITION OF energy.device_rollup_1m "
        "FOR VALUES FROM ('2099-12-31') TO ('2100-01-01')",
        f"DROP TABLE energy.device_rollup_1m_p{new_day:%Y%m%d}",
        "DELETE FROM energy.alembic_version",
    ]
    with psycopg.connect(dsn, autocommit=True) as conn:
        for stmt in forbidden:
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(stmt)
        with pytest.raises(psycopg.errors.RaiseException, match="not a partitioned table"):
            conn.execute(
                "SELECT energy.ensure_day_partitions('pg_class', now()::date, now()::date)"
            )


def test_bi_reader_selects_only_in_read_only_transactions_with_a_timeout(pg_dsn, logins):
    write(pg_dsn, day_start(25))  # a partition created after the migration: default privileges
    dsn = as_user(pg_dsn, logins("bi", BI_LOGIN_SQL))
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM energy.device_rollup_1m").fetchone()[0] == 1
        partition = f"energy.device_rollup_1m_p{day_start(25):%Y%m%d}"
        assert conn.execute(f"SELECT count(*) FROM {partition}").fetchone()[0] == 1
        conn.execute("SELECT count(*) FROM energy.quarantine, energy.rollup_minutes")
        assert conn.execute("SHOW default_transaction_read_only").fetchone()[0] == "on"
        assert conn.execute("SHOW statement_timeout").fetchone()[0] == "30s"
        for stmt in (
            "INSERT INTO energy.devices (device_id, household_id) VALUES ('x', 'y')",
            "DELETE FROM energy.device_rollup_1m",
            "CREATE TABLE energy.x (a integer)",
            "SELECT energy.ensure_day_partitions('energy.device_rollup_1m', '2099-01-01', "
            "'2099-01-01')",
        ):
            with pytest.raises((errors.InsufficientPrivilege, errors.ReadOnlySqlTransaction)):
                conn.execute(stmt)
        # Even past the grants, the transaction itself refuses writes.
        with pytest.raises(errors.ReadOnlySqlTransaction):
            conn.execute("CREATE TEMP TABLE t (a integer)")
        conn.execute("SET statement_timeout = '100ms'")
        with pytest.raises(errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(2)")


def test_owner_login_migrates_a_database_it_owns(pg_server, logins):
    owner = logins("owner", member_of("energy_owner"))
    name = f"t_owner_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(name), sql.Identifier(owner)
            )
        )
    try:
        dsn = as_user(pg_server.dsn(name), owner)
        upgrade(dsn)
        upgrade(dsn)  # idempotent
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT version_num FROM energy.alembic_version").fetchone()[0]
            owners = conn.execute(
                "SELECT DISTINCT pg_get_userbyid(c.relowner) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'energy' AND c.relkind IN ('r', 'p')"
            ).fetchall()
        assert owners == [("energy_owner",)]
    finally:
        with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def fresh_cluster() -> Iterator[LocalPostgres]:
    """A cluster of its own, where the roles do not exist yet."""
    root = Path(tempfile.mkdtemp(prefix="energy-roles-"))
    os.chmod(root, 0o755)  # the server may run as `postgres`
    server = LocalPostgres(root / "pg", free_port(), fast_unsafe=True)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


def test_concurrent_first_migrations_create_the_roles_once(fresh_cluster):
    # Processes, not threads: Alembic's migration context is process-global.
    pg_server = fresh_cluster
    names = [f"t_conc_{i}" for i in range(3)]
    for name in names:
        pg_server.create_database(name)
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "energy_pipeline.cli", "migrate"],
                env={**os.environ, "ENERGY_PG_DSN": pg_server.dsn(name)},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for name in names
        ]
        outputs = [(p.wait(timeout=120), p.stdout.read() if p.stdout else "") for p in procs]
    finally:
        with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
            for name in names:
                conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
    assert all(code == 0 for code, _ in outputs), outputs
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        roles = conn.execute(
            "SELECT count(*) FROM pg_roles "
            "WHERE rolname IN ('energy_owner', 'energy_writer', 'bi_reader')"
        ).fetchone()[0]
    assert roles == 3
