"""`energy-pipeline init` against existing servers: databases, migrations, roles, DAGSTER_HOME,
retention; run twice to show it is idempotent."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg import sql

from energy_pipeline.cli import main
from energy_pipeline.config import PROJECT_ROOT, dagster_storage_url
from energy_pipeline.influx import InfluxClient
from energy_pipeline_tests.helpers import BI_LOGIN_SQL, as_user


def drop_databases(pg_server, *names: str) -> None:
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        for name in names:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def init_env(monkeypatch, tmp_path, influx_server, pg_server):
    suffix = uuid.uuid4().hex[:8]
    names = {"influx": f"i_{suffix}", "energy": f"e_{suffix}", "dagster": f"d_{suffix}"}
    for var in ("INFLUXDB_URL", "INFLUXDB_RETENTION_POLICY", "INFLUXDB_TOKEN", "INFLUXDB_USERNAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ENERGY_INFLUX_PORT", str(influx_server.port))
    monkeypatch.setenv("INFLUXDB_DATABASE", names["influx"])
    monkeypatch.setenv("ENERGY_PG_DSN", pg_server.dsn(names["energy"]))
    monkeypatch.setenv("DAGSTER_PG_URL", dagster_storage_url(pg_server.dsn(names["dagster"])))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv("ENERGY_RAW_RETENTION_DAYS", "3")
    yield names
    drop_databases(pg_server, names["energy"], names["dagster"])
    InfluxClient(influx_server.url, names["influx"]).query_json(
        f'DROP DATABASE "{names["influx"]}"'
    )


def test_init_sets_up_everything_and_is_idempotent(
    init_env, capsys, pg_server, influx_server, tmp_path, logins
):
    assert main(["init"]) == 0
    first = capsys.readouterr().out
    assert main(["init"]) == 0
    second = capsys.readouterr().out
    assert "created" in first and "created" not in second
    assert f"database {init_env['dagster']!r}: created, for its owner only" in first
    assert f"database {init_env['dagster']!r}: exists (" in second
    assert f"database {init_env['energy']!r}: exists" in second
    assert "dagster.yaml up to date" in second
    assert (tmp_path / "dagster_home" / "dagster.yaml").read_bytes() == (
        PROJECT_ROOT / "dagster.yaml"
    ).read_bytes()
    assert "export DAGSTER_PG_URL='postgresql+psycopg2://" in second
    with psycopg.connect(pg_server.dsn(init_env["energy"])) as conn:
        assert conn.execute("SELECT version_num FROM energy.alembic_version").fetchone()[0]
        assert conn.execute("SELECT to_regrole('bi_reader') IS NOT NULL").fetchone()[0]
    with psycopg.connect(pg_server.dsn(init_env["dagster"])) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    # A BI login reads the energy database and cannot even connect to Dagster's.
    bi = logins("bi", BI_LOGIN_SQL)
    with psycopg.connect(as_user(pg_server.dsn(init_env["energy"]), bi)) as conn:
        assert conn.execute("SELECT count(*) FROM energy.bi_households").fetchone() == (0,)
    with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
        psycopg.connect(as_user(pg_server.dsn(init_env["dagster"]), bi)).close()
    client = InfluxClient(influx_server.url, init_env["influx"])
    series = client.query_json(f'SHOW RETENTION POLICIES ON "{init_env["influx"]}"')[0]["series"]
    cols = series[0]["columns"]
    default = [r for r in series[0]["values"] if r[cols.index("default")]]
    assert default[0][cols.index("duration")] == "72h0m0s"


def test_init_without_createdb_says_so_and_works_once_the_database_exists(
    init_env, capsys, pg_server, monkeypatch
):
    user = f"u_owner_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN IN ROLE energy_owner").format(sql.Identifier(user))
        )
    dsn = pg_server.dsn(init_env["energy"]).replace("postgres@", f"{user}@", 1)
    monkeypatch.setenv("ENERGY_PG_DSN", dsn)
    try:
        assert main(["init"]) == 2
        out, err = capsys.readouterr()
        assert f"database {init_env['energy']!r}: skipped, {user!r} lacks CREATEDB" in out
        assert "migrating" in err and "failed" in err
        with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(init_env["energy"]), sql.Identifier(user)
                )
            )
        assert main(["init"]) == 0
        assert main(["init"]) == 0
    finally:
        drop_databases(pg_server, init_env["energy"])
        with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(user)))
