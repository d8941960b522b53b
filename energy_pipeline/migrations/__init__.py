"""Versioned schema migrations for the `energy` schema, run with Alembic."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from alembic import command
from alembic.config import Config
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy.engine import URL

from energy_pipeline.config import dsn_secrets, redact_dsn, scrub
from energy_pipeline.storage import StorageError

HERE = Path(__file__).resolve().parent
# Day partitions of the minute rollup that every `migrate` makes sure exist, around today (UTC).
PARTITION_DAYS_BEFORE = 1
PARTITION_DAYS_AFTER = 7


class MigrationError(StorageError):
    """Migrating failed; the message never contains the DSN's password."""


def sqlalchemy_url(dsn: str) -> URL:
    """A SQLAlchemy URL (psycopg 3 driver) for a libpq DSN, given as a URL or as key=value pairs."""
    try:
        params = {k: str(v) for k, v in conninfo_to_dict(dsn).items()}
    except Exception:  # noqa: BLE001 - libpq's message quotes the DSN, password included
        params = None
    if params is None:
        raise MigrationError("the PostgreSQL DSN is not a valid connection string")
    host, port = params.pop("host", None), params.pop("port", None)
    # Several hosts (failover) only fit SQLAlchemy's query form.
    if (host and "," in host) or (port and "," in port):
        params.update({k: v for k, v in (("host", host), ("port", port)) if v})
        host = port = None
    return URL.create(
        "postgresql+psycopg",
        username=params.pop("user", None),
        password=params.pop("password", None),
        host=host,
        port=int(port) if port else None,
        database=params.pop("dbname", None),
        query=params,
    )


def alembic_config(dsn: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    # Handed over as an object: no ConfigParser interpolation of '%', no URL text to print.
    cfg.attributes["sqlalchemy_url"] = sqlalchemy_url(dsn)
    return cfg


def _run(dsn: str, action: str, revision: str) -> None:
    cfg = alembic_config(dsn)
    try:
        getattr(command, action)(cfg, revision)
        return
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy and libpq errors may quote the URL
        detail = scrub(f"{type(exc).__name__}: {exc}", dsn_secrets(dsn))
    # Raised outside the `except` so no chained exception carries the unscrubbed text.
    raise MigrationError(f"migrating {redact_dsn(dsn)} failed: {detail}")


def upgrade(dsn: str, revision: str = "heads") -> None:
    """Bring the database at `dsn` to `revision` (idempotent; safe to run concurrently).

    "heads" rather than "head": a revision written on a branch of its own (as 0006-0009 were,
    merged by 0010) is applied as well. At the newest revision, also makes sure the day
    partitions around today exist, and that only the pipeline's roles create temporary tables.
    """
    _run(dsn, "upgrade", revision)
    if revision in ("head", "heads"):
        from energy_pipeline.storage import connect, create_partitions

        today = datetime.now(UTC).date()
        with connect(dsn) as conn:
            for table in ("device_rollup_1m", "household_rollup_5m", "device_rollup_1h"):
                create_partitions(
                    conn,
                    table,
                    today - timedelta(days=PARTITION_DAYS_BEFORE),
                    today + timedelta(days=PARTITION_DAYS_AFTER),
                )
            conn.execute(_TEMPORARY_FOR_THE_PIPELINE)


# PostgreSQL grants TEMPORARY on every database to PUBLIC, so a BI login that switched its
# read-only default off could still create (and fill) temporary tables. The pipeline's roles keep
# it (the writer stages device imports in one). Database privileges are not copied with a
# template or kept by a dump, so this runs with every upgrade, not in a migration; only the
# database's owner (or a member of its role, or a superuser) may change them, and for anyone else
# it is left as it is.
_TEMPORARY_FOR_THE_PIPELINE = """
DO $$
BEGIN
    IF pg_has_role(current_user, (SELECT datdba FROM pg_database
                                   WHERE datname = current_database()), 'USAGE')
       OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO energy_owner, energy_writer',
                       current_database());
        EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
    END IF;
END $$
"""


def downgrade(dsn: str, revision: str) -> None:
    """Take the database at `dsn` back to `revision`."""
    _run(dsn, "downgrade", revision)
