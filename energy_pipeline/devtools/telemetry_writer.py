"""Writes simulated telemetry through InfluxDB's `/write`, as history or live at 1 Hz per device.

Devices are registered in PostgreSQL first, as a device-management system would do.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime, timedelta

import polars as pl
import requests

from energy_pipeline.config import Settings
from energy_pipeline.devtools.lineprotocol import encode_points
from energy_pipeline.devtools.simulator import build_fleet, generate_points, inject_faults
from energy_pipeline.influx import InfluxClient, InfluxError
from energy_pipeline.storage import connect, upsert_devices

NS = 1_000_000_000
# Lines per POST: large enough to amortise HTTP, small enough to stay far below body limits.
WRITE_BATCH_LINES = 50_000
# Live mode writes "late" points this long after their timestamp.
LIVE_LATE_DELAY_S = 90
# Waits between delivery attempts while InfluxDB is unreachable: short at first so a restart is
# noticed fast, capped so a long outage costs one attempt every few seconds, not a busy loop.
RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 15.0
# On stop, how long buffered points may still take to deliver before they are counted as unsent.
FLUSH_ON_STOP_S = 10.0


@dataclass(frozen=True)
class SimulationOptions:
    devices: int = 200
    seed: int = 42
    faults: tuple[str, ...] = ()
    fault_rate: float = 0.01
    hostile_ids: bool = False
    register: bool = True
    # Live mode keeps at most this many seconds of the fleet's points while InfluxDB is
    # unreachable (10 minutes of 5,000 devices is ~3 M points, ~200 MB); beyond that the oldest go.
    buffer_seconds: int = 600


def write_points(
    influx: InfluxClient,
    points: pl.DataFrame,
    measurement: str,
    pool: Executor | None = None,
) -> int:
    """Encode and POST points in batches (concurrently on `pool` if given); returns the lines."""
    batches = [
        encode_points(points.slice(offset, WRITE_BATCH_LINES), measurement)
        for offset in range(0, points.height, WRITE_BATCH_LINES)
    ]
    if pool is None:
        for body in batches:
            influx.write_lines(body)
    else:
        for done in [pool.submit(influx.write_lines, body) for body in batches]:
            done.result()
    return points.height


def prepare_fleet(settings: Settings, options: SimulationOptions) -> pl.DataFrame:
    fleet = build_fleet(options.devices, seed=options.seed, hostile_ids=options.hostile_ids)
    if options.register:
        with connect(settings.pg_dsn) as conn:
            upsert_devices(conn, fleet)
    return fleet


def _say(message: str) -> None:
    print(message, flush=True)  # noqa: T201 - progress output of a command-line tool


def run_history(
    influx: InfluxClient,
    settings: Settings,
    options: SimulationOptions,
    start: datetime,
    end: datetime,
) -> dict[str, int]:
    """Write every second of [start, end) minute by minute; late points go last."""
    fleet = prepare_fleet(settings, options)
    totals: dict[str, int] = {"points": 0}
    late: list[pl.DataFrame] = []
    minutes = int((end - start).total_seconds() // 60)
    started = time.monotonic()
    for i in range(minutes):
        t0 = start + timedelta(minutes=i)
        points = generate_points(fleet, int(t0.timestamp()) * NS, 60, seed=options.seed + i)
        if options.faults:
            batch = inject_faults(points, options.faults, options.fault_rate, options.seed + i)
            points = batch.points
            late.append(batch.late)
            for fault, n in batch.counts.items():
                totals[fault] = totals.get(fault, 0) + n
        totals["points"] += write_points(influx, points, settings.influx_measurement)
        if (i + 1) % 5 == 0 or i + 1 == minutes:
            rate = totals["points"] / max(time.monotonic() - started, 1e-9)
            _say(
                f"wrote minute {i + 1}/{minutes} ({t0:%H:%M} UTC): {totals['points']:,} points, "
                f"{rate:,.0f} points/s"
            )
    if late:
        totals["points"] += write_points(influx, pl.concat(late), settings.influx_measurement)
    _say(f"done: {totals}")
    return totals


def is_transient(exc: InfluxError) -> bool:
    """True when InfluxDB could not be reached or kept failing (worth retrying), not a refusal."""
    return isinstance(exc.__cause__, requests.RequestException)


class BufferedWriter:
    """Delivers point frames to InfluxDB in order from a bounded buffer, riding out outages.

    `put` never blocks or fails: frames queue up, and a background thread writes them oldest
    first. While InfluxDB is unreachable the thread retries with exponential backoff, logging the
    outage once when it starts and once when it ends. Points keep their own timestamps, so what was
    measured during an outage lands afterwards as late data. When more than `max_points` are
    waiting, the oldest frames are dropped and counted (logged once per outage, totalled at the
    end): the newest data matters most to a live pipeline and memory stays bounded.
    """

    def __init__(
        self,
        influx: InfluxClient,
        measurement: str,
        max_points: int,
        say: Callable[[str], None],
        retry_initial_s: float = RETRY_INITIAL_S,
        retry_max_s: float = RETRY_MAX_S,
    ) -> None:
        self.influx = influx
        self.measurement = measurement
        self.max_points = max(1, max_points)
        self.say = say
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.delivered = 0
        self.dropped = 0
        self.outages = 0
        self.error: InfluxError | None = None
        self._pending: deque[pl.DataFrame] = deque()
        self._pending_points = 0
        self._cond = threading.Condition()
        self._closing = False
        self._outage_since: float | None = None
        self._outage_dropped = 0
        self._thread = threading.Thread(target=self._run, name="influx-writer", daemon=True)
        self._thread.start()

    @property
    def buffered(self) -> int:
        """Points waiting for delivery (not counting a batch being written right now)."""
        with self._cond:
            return self._pending_points

    def put(self, points: pl.DataFrame) -> None:
        """Queue points for delivery; drops the oldest waiting points when the buffer is full."""
        if points.height == 0:
            return
        with self._cond:
            self._pending.append(points)
            self._pending_points += points.height
            self._trim()
            self._cond.notify()

    def _trim(self) -> None:
        # Caller holds the lock. Whole frames go, oldest first; the newest frame always stays.
        dropped = 0
        while self._pending_points > self.max_points and len(self._pending) > 1:
            frame = self._pending.popleft()
            self._pending_points -= frame.height
            dropped += frame.height
        if not dropped:
            return
        if self._outage_dropped == 0:
            self.say(
                f"live: buffer full ({self.max_points:,} points): dropping the oldest points "
                "while InfluxDB cannot take them (the count follows on recovery)"
            )
        self.dropped += dropped
        self._outage_dropped += dropped

    def _take(self) -> list[pl.DataFrame] | None:
        """The oldest frames, up to one write batch; None once closing with nothing left."""
        with self._cond:
            while not self._pending and not self._closing:
                self._cond.wait()
            if not self._pending:
                return None
            frames: list[pl.DataFrame] = []
            lines = 0
            while self._pending and (
                not frames or lines + self._pending[0].height <= WRITE_BATCH_LINES
            ):
                frame = self._pending.popleft()
                self._pending_points -= frame.height
                frames.append(frame)
                lines += frame.height
            return frames

    def _requeue(self, frames: list[pl.DataFrame]) -> None:
        with self._cond:
            for frame in reversed(frames):
                self._pending.appendleft(frame)
                self._pending_points += frame.height
            self._trim()

    def _run(self) -> None:
        delay = self.retry_initial_s
        while (frames := self._take()) is not None:
            batch = frames[0] if len(frames) == 1 else pl.concat(frames)
            attempted_at = time.monotonic()  # the client's own retries take seconds to give up
            try:
                write_points(self.influx, batch, self.measurement)
            except InfluxError as exc:
                self._requeue(frames)
                if not is_transient(exc):
                    self.error = exc
                    return
                if self._outage_since is None:
                    self._outage_since = attempted_at
                    self.outages += 1
                    self.say(
                        f"live: InfluxDB unreachable ({exc}); buffering points and retrying "
                        f"with backoff up to {self.retry_max_s:.0f}s"
                    )
                with self._cond:
                    if self._closing:
                        return
                    self._cond.wait(delay)
                delay = min(self.retry_max_s, delay * 2)
                continue
            self.delivered += batch.height
            delay = self.retry_initial_s
            if self._outage_since is not None:
                lost = (
                    f"{self._outage_dropped:,} dropped, buffer was full"
                    if self._outage_dropped
                    else "none dropped"
                )
                self.say(
                    f"live: InfluxDB reachable again after "
                    f"{time.monotonic() - self._outage_since:.0f}s; delivering buffered points "
                    f"with their original timestamps ({lost})"
                )
                self._outage_since = None
                with self._cond:
                    self._outage_dropped = 0

    def close(self, timeout_s: float = FLUSH_ON_STOP_S) -> int:
        """Deliver what is buffered within `timeout_s`, stop the thread; returns points not sent."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._cond.notify_all()
        # Let the thread drain while InfluxDB answers; then tell it to stop retrying.
        while self._thread.is_alive() and time.monotonic() < deadline:
            with self._cond:
                if not self._pending:
                    break
            time.sleep(0.05)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(max(0.1, deadline - time.monotonic()))
        with self._cond:
            return self._pending_points


@contextlib.contextmanager
def _quiet_retries() -> Iterator[None]:
    """Silence urllib3's per-attempt retry warnings: the writer logs an outage once instead."""
    logger = logging.getLogger("urllib3.connectionpool")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_live(
    influx: InfluxClient,
    settings: Settings,
    options: SimulationOptions,
    duration_s: float = 0,
    stop: threading.Event | None = None,
) -> dict[str, int]:
    """Write one point per device each second until interrupted, `duration_s` elapsed or `stop`
    is set, buffering through InfluxDB outages (see `BufferedWriter`)."""
    fleet = prepare_fleet(settings, options)
    _say(f"live: {fleet.height} devices at 1 Hz into {influx.url} db={influx.database}")
    totals = {"points": 0, "seconds": 0}
    delayed: deque[tuple[float, pl.DataFrame]] = deque()
    started = time.time()
    second = int(started)
    with _quiet_retries():
        writer = BufferedWriter(
            influx,
            settings.influx_measurement,
            max_points=max(1, fleet.height) * options.buffer_seconds,
            say=_say,
        )
        try:
            while (not duration_s or time.time() - started < duration_s) and not (
                stop is not None and stop.is_set()
            ):
                if writer.error is not None:
                    raise writer.error
                # Write each second once it has passed, as devices report what they measured.
                time.sleep(max(0.0, second + 1 - time.time()))
                points = generate_points(fleet, second * NS, 1, seed=options.seed)
                if options.faults:
                    batch = inject_faults(points, options.faults, options.fault_rate, second)
                    points = batch.points
                    if batch.late.height:
                        delayed.append((time.time() + LIVE_LATE_DELAY_S, batch.late))
                while delayed and delayed[0][0] <= time.time():
                    points = pl.concat([points, delayed.popleft()[1]])
                writer.put(points)
                totals["points"] += points.height
                totals["seconds"] += 1
                second += 1
                if time.time() - second > 5:  # fell behind (machine busy): skip ahead, say so
                    skipped = int(time.time()) - second
                    _say(f"live: {skipped}s behind, skipping ahead")
                    second += skipped
                if totals["seconds"] % 10 == 0:
                    _say(
                        f"live: {totals['points']:,} points in {totals['seconds']} s "
                        f"({writer.delivered:,} delivered, {writer.buffered:,} buffered)"
                    )
        except KeyboardInterrupt:
            pass
        finally:
            unsent = writer.close()
    totals |= {
        "delivered": writer.delivered,
        "dropped": writer.dropped,
        "unsent": unsent,
        "outages": writer.outages,
    }
    _say(
        f"live: stopped after {totals['seconds']} s: {writer.delivered:,} of {totals['points']:,} "
        f"points delivered, {writer.dropped:,} dropped (buffer full), {unsent:,} unsent at stop"
    )
    return totals
