"""One window of minutes end to end: read raw points, roll up, replace the window in PostgreSQL.

Long windows (catch-up, backfills) go in chunks so memory does not grow with the range; the read of
the next chunk overlaps the roll-up and write of the current one. Each chunk is one transaction.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import polars as pl
import psycopg

from energy_pipeline.rollups import roll_up_minutes
from energy_pipeline.sources import RawSource, WindowRead
from energy_pipeline.storage import registered_devices, replace_minutes


@dataclass
class WindowStats:
    """What processing a window did, for materialization metadata and the benchmark."""

    start: datetime
    end: datetime
    points_read: int = 0
    rows_written: int = 0
    rejected: int = 0
    duplicates_dropped: int = 0
    chunks: int = 0
    # Raw-point queries sent; more than chunks x slices means answers came back short and
    # were read again in smaller pieces.
    queries: int = 0
    seconds: dict[str, float] = field(
        default_factory=lambda: {"read": 0.0, "validate": 0.0, "roll_up": 0.0, "write": 0.0}
    )
    # The ledger rows written, one per minute: each minute's own figures.
    per_minute: pl.DataFrame = field(default_factory=pl.DataFrame)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


def chunk_windows(
    start: datetime, end: datetime, chunk_minutes: int
) -> list[tuple[datetime, datetime]]:
    """Split [start, end) into consecutive windows of at most `chunk_minutes`."""
    step = timedelta(minutes=chunk_minutes)
    out, s = [], start
    while s < end:
        out.append((s, min(s + step, end)))
        s += step
    return out


def process_window(
    source: RawSource,
    conn: psycopg.Connection,
    start: datetime,
    end: datetime,
    chunk_minutes: int = 5,
    log: Callable[[str], None] | None = None,
) -> WindowStats:
    """Roll up every minute of [start, end) and replace those minutes in PostgreSQL."""
    stats = WindowStats(start, end)
    ledgers: list[pl.DataFrame] = []
    devices = registered_devices(conn)
    chunks = chunk_windows(start, end, chunk_minutes)

    def read(window: tuple[datetime, datetime]) -> tuple[WindowRead, float]:
        t = time.perf_counter()
        got = source.read(*window)
        return got, time.perf_counter() - t

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="influx-read") as pool:
        pending = pool.submit(read, chunks[0]) if chunks else None
        for i, (c_start, c_end) in enumerate(chunks):
            assert pending is not None
            wait = time.perf_counter()
            got, read_s = pending.result()
            # Time spent blocked on the read is what the read costs this run (the rest overlapped).
            stats.add("read", time.perf_counter() - wait if i else read_s)
            pending = pool.submit(read, chunks[i + 1]) if i + 1 < len(chunks) else None
            batch = roll_up_minutes(got.points, c_start, c_end, devices, got.checksums)
            stats.queries += got.queries
            del got
            for stage, s in batch.seconds.items():
                stats.add(stage, s)
            t = time.perf_counter()
            replace_minutes(
                conn,
                c_start,
                c_end,
                batch.rollups,
                batch.quarantine,
                batch.ledger,
                computed_at=datetime.now(UTC),
            )
            stats.add("write", time.perf_counter() - t)
            stats.points_read += batch.points_read
            stats.rows_written += batch.rollups.height
            stats.rejected += batch.rejected
            stats.duplicates_dropped += batch.duplicates_dropped
            stats.chunks += 1
            ledgers.append(batch.ledger)
            if log is not None and len(chunks) > 1:
                log(
                    f"chunk {i + 1}/{len(chunks)} {c_start:%H:%M}-{c_end:%H:%M}: "
                    f"{batch.points_read} points, {batch.rollups.height} rows"
                )
    stats.per_minute = pl.concat(ledgers) if ledgers else pl.DataFrame()
    return stats
