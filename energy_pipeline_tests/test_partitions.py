"""Day partitions are created outside the write transaction: open readers never block a write."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import polars as pl
import psycopg
import pytest

from energy_pipeline import storage
from energy_pipeline.schemas import LEDGER_COLUMNS, QUARANTINE_SCHEMA, ROLLUP_COLUMNS
from energy_pipeline.storage import StorageError, connect, replace_minutes


def minute_frames(minute: datetime) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """One rollup row and its ledger row for `minute`, whatever columns the tables have."""

    def value(column: str) -> object:
        if column == "bucket":
            return minute
        return {"device_id": "dev-1", "household_id": "hh-1"}.get(column, 1)

    rollups = pl.DataFrame({c: [value(c)] for c in ROLLUP_COLUMNS})
    ledger = pl.DataFrame({c: [value(c)] for c in LEDGER_COLUMNS})
    return rollups, pl.DataFrame(schema=QUARANTINE_SCHEMA), ledger


def write_minute(dsn: str, minute: datetime) -> None:
    # A statement timeout turns "blocked forever" into a failure of this test.
    with connect(dsn, options="-c statement_timeout=10000") as conn:
        replace_minutes(
            conn, minute, minute + timedelta(minutes=1), *minute_frames(minute), datetime.now(UTC)
        )


def timed_write(dsn: str, minute: datetime) -> tuple[float, BaseException | None]:
    """Write `minute` in a thread; seconds it took and its error, if any."""
    outcome: dict[str, BaseException | None] = {"error": None}

    def run() -> None:
        try:
            write_minute(dsn, minute)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            outcome["error"] = exc

    started = time.monotonic()
    worker = threading.Thread(target=run)
    worker.start()
    worker.join(timeout=30)
    return time.monotonic() - started, outcome["error"]


def day_start(days_from_today: int) -> datetime:
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today + timedelta(days=days_from_today)


def partition_exists(dsn: str, day: datetime) -> bool:
    name = f"energy.device_rollup_1m_p{day:%Y%m%d}"
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()[0]


def test_open_reader_transaction_does_not_block_a_minute_write(pg_dsn):
    # Migrations create partitions up to 7 days ahead; a write on day +6 has its partition, and
    # only a partition "ahead" of it (day +8) is missing.
    minute = day_start(6) + timedelta(hours=1)
    assert partition_exists(pg_dsn, minute)
    with psycopg.connect(pg_dsn) as reader:  # BI session: a transaction left open on the parent
        reader.execute("SELECT count(*) FROM energy.device_rollup_1m").fetchone()
        seconds, error = timed_write(pg_dsn, minute)
        assert error is None, error
        assert seconds < 5
        # A second reader is not queued behind anything either.
        with psycopg.connect(pg_dsn, options="-c statement_timeout=3000") as other:
            assert other.execute("SELECT count(*) FROM energy.device_rollup_1m").fetchone()[0] == 1
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute("SELECT device_id, bucket FROM energy.device_rollup_1m").fetchall()
    assert rows == [("dev-1", minute)]


def test_a_write_whose_partition_exists_runs_no_ddl(pg_dsn):
    minute = day_start(0) + timedelta(hours=1)
    write_minute(pg_dsn, minute)  # creates whatever is missing ahead
    with psycopg.connect(pg_dsn) as locker:
        # Conflicts with partition DDL (ATTACH, CREATE ... PARTITION OF), not with the write's
        # ROW EXCLUSIVE: the write only gets through if it runs no DDL.
        locker.execute("LOCK TABLE energy.device_rollup_1m IN SHARE UPDATE EXCLUSIVE MODE")
        seconds, error = timed_write(pg_dsn, minute)
    assert error is None, error
    assert seconds < 5


def test_missing_partition_is_created_before_the_write_even_with_readers(pg_dsn):
    minute = day_start(30)
    assert not partition_exists(pg_dsn, minute)
    with psycopg.connect(pg_dsn) as reader:
        reader.execute("SELECT count(*) FROM energy.device_rollup_1m").fetchone()
        seconds, error = timed_write(pg_dsn, minute)
    assert error is None, error
    assert seconds < 5
    for days in range(3):
        assert partition_exists(pg_dsn, minute + timedelta(days=days))


def test_partition_creation_under_lock_contention_fails_clearly_and_soon(pg_dsn):
    minute = day_start(40)
    with psycopg.connect(pg_dsn) as locker:
        locker.execute("LOCK TABLE energy.device_rollup_1m IN SHARE MODE")
        seconds, error = timed_write(pg_dsn, minute)
    assert isinstance(error, StorageError), error
    assert "could not create the partitions of energy.device_rollup_1m" in str(error)
    # Bounded: attempts × lock timeout plus backoff, far below the statement timeout.
    bound = storage.PARTITION_ATTEMPTS * storage.PARTITION_LOCK_TIMEOUT_MS / 1000 + 2
    assert seconds < bound
    assert not partition_exists(pg_dsn, minute)


@pytest.mark.parametrize("days", [0, 3])
def test_partitions_survive_a_rewrite(pg_dsn, days):
    minute = day_start(days) + timedelta(minutes=5)
    write_minute(pg_dsn, minute)
    write_minute(pg_dsn, minute)
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM energy.device_rollup_1m").fetchone()[0] == 1
