"""Alembic environment: online migrations only, version table inside the `energy` schema."""

from alembic import context
from sqlalchemy import create_engine, text

SCHEMA = "energy"
# Any constant works; it only has to be the same for every process that migrates.
MIGRATION_LOCK_KEY = 7_205_511_001


def run_migrations_online() -> None:
    url = context.config.attributes.get("sqlalchemy_url") or context.config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise RuntimeError(
            "sqlalchemy.url is not set: run migrations through energy_pipeline.migrations"
        )
    engine = create_engine(url)
    with engine.connect() as conn:
        # Two processes starting at once (webserver, daemon, tests) must not migrate twice.
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
        try:
            conn.execute(text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
            conn.commit()
            context.configure(connection=conn, version_table_schema=SCHEMA)
            with context.begin_transaction():
                context.run_migrations()
            conn.commit()
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_KEY})
            conn.commit()
    engine.dispose()


run_migrations_online()
