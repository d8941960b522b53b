"""Real InfluxDB and PostgreSQL servers for the test session, and an isolated database per test."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from energy_pipeline.config import Settings
from energy_pipeline.devtools.services import LocalInflux, LocalPostgres, free_port
from energy_pipeline.influx import InfluxClient
from energy_pipeline.migrations import upgrade
from energy_pipeline_tests.helpers import database_from

TEMPLATE_DB = "energy_template"


@pytest.fixture(scope="session")
def server_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="energy-tests-"))
    # PostgreSQL runs as the `postgres` user when the suite runs as root: it must reach the dir.
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def influx_server(server_root: Path) -> Iterator[LocalInflux]:
    server = LocalInflux(server_root / "influx", free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_server(server_root: Path) -> Iterator[LocalPostgres]:
    server = LocalPostgres(server_root / "pg", free_port(), fast_unsafe=True)
    server.start()
    server.create_database(TEMPLATE_DB)
    upgrade(server.dsn(TEMPLATE_DB))
    yield server
    server.stop()


@pytest.fixture
def pg_dsn(pg_server: LocalPostgres) -> Iterator[str]:
    """A fresh database with the schema migrated, dropped after the test."""
    with database_from(pg_server, TEMPLATE_DB) as dsn:
        yield dsn


@pytest.fixture
def influx_db(influx_server: LocalInflux) -> Iterator[InfluxClient]:
    """A client for a fresh InfluxDB database, dropped after the test."""
    client = InfluxClient(influx_server.url, f"t_{uuid.uuid4().hex[:12]}")
    client.create_database()
    yield client
    client.query_json(f'DROP DATABASE "{client.database}"')


@pytest.fixture
def settings(
    influx_server: LocalInflux, influx_db: InfluxClient, pg_dsn: str, pg_server: LocalPostgres
) -> Settings:
    base = Settings.from_env({})
    return replace(
        base,
        influx_url=influx_server.url,
        influx_database=influx_db.database,
        pg_dsn=pg_dsn,
        dagster_pg_url=pg_server.dsn("postgres"),
        settle_seconds=0,
        chunk_minutes=2,
    )


@pytest.fixture
def dagster_db(pg_server: LocalPostgres) -> Iterator[str]:
    """A fresh database for a Dagster instance's storage, dropped after the test."""
    name = f"dagster_{uuid.uuid4().hex[:8]}"
    pg_server.create_database(name)
    yield pg_server.dsn(name)
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def logins(pg_server: LocalPostgres) -> Iterator[Callable[..., str]]:
    """Create login roles on the test cluster (trust auth: no password needed), each by
    `statements` with `{user}` its new name; dropped after, with what they own."""
    made: list[str] = []

    def make(prefix: str, statements: tuple[str, ...] = ("CREATE ROLE {user} LOGIN",)) -> str:
        name = f"u_{prefix}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
            for stmt in statements:
                conn.execute(sql.SQL(stmt).format(user=sql.Identifier(name)))
        made.append(name)
        return name

    yield make
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        for name in made:
            for (db,) in conn.execute("SELECT datname FROM pg_database WHERE datallowconn"):
                with psycopg.connect(pg_server.dsn(db), autocommit=True) as c:
                    c.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
