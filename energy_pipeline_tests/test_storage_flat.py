"""Storage stays flat: over 70 simulated days with daily retention, the pipeline's database and
the Dagster instance's stop growing once the horizons are reached; without retention they grow."""

from collections.abc import Iterator

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from energy_pipeline.config import dagster_storage_url
from energy_pipeline.devtools.bench.retention import (
    RUN_WINDOW_DAYS,
    DagsterSide,
    format_sizes,
    simulate,
)

DAYS = 70
# The longest simulated horizon is 30 days: from day 45 on, every table only turns over.
LEVEL_FROM, LEVEL_TO = 45, DAYS - 1
TOLERANCE = 0.05


@pytest.fixture
def second_pg_dsn(pg_dsn: str) -> Iterator[str]:
    """Another fresh migrated database beside `pg_dsn`: the same load without retention."""
    name = pg_dsn.rsplit("/", 1)[1] + "_none"
    admin = pg_dsn.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE energy_template").format(sql.Identifier(name))
        )
    yield pg_dsn.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def test_database_sizes_level_off_after_the_horizons(pg_dsn, second_pg_dsn, dagster_db):
    overrides = {"storage": {"postgres": {"postgres_url": dagster_storage_url(dagster_db)}}}
    with dg.instance_for_test(overrides=overrides) as instance:
        sizes = simulate(pg_dsn, second_pg_dsn, DAYS, dagster_day=DagsterSide(instance, dagster_db))
    print(format_sizes(sizes))  # the figures, for the test log
    level, end = sizes[LEVEL_FROM], sizes[LEVEL_TO]

    # With retention, the pipeline's database is flat from day 45 to day 69 ...
    assert abs(end.energy_with - level.energy_with) <= TOLERANCE * level.energy_with
    # ... while the same load without retention keeps growing (by about a third here).
    assert end.energy_without > 1.25 * level.energy_without
    assert end.energy_with < 0.8 * end.energy_without

    # Dagster: 70 runs created, only the moving window's stay; the database stops growing. What
    # a run adds is measured over the first days (nothing purged yet): 24 more unpurged days would
    # add 24 times that.
    per_run = (sizes[RUN_WINDOW_DAYS].dagster_bytes - sizes[0].dagster_bytes) / RUN_WINDOW_DAYS
    assert per_run > 0
    assert end.dagster_runs <= RUN_WINDOW_DAYS + 1
    assert end.dagster_bytes - level.dagster_bytes < 3 * per_run
