"""The Dagster daemon as energy-pipeline runs it: `python -m energy_pipeline.daemon run -w
workspace.yaml` is `dagster-daemon run` with two changes.

Sensors are evaluated every second. Dagster's sensor daemon sleeps until 5 s have passed since its
last loop began, whatever a sensor's `minimum_interval_seconds`, so a closed minute waited its
settle time plus up to 5 s more before its run was even requested: the largest avoidable share of
"minute closed → rolled up" (and of every alert's latency). ENERGY_SENSOR_LOOP_SECONDS sets the
loop (default 1 s; each loop reads the sensors' state from the instance storage).

Python logging stays readable while a server is unreachable. Two things flooded the daemon log
during a PostgreSQL outage (1,865 lines in 31 s here):
- dagster-postgres retries connections with `logging.warning(...)` on the root logger (4 lines per
  attempt, several attempts a second). With no handler on the root logger, the first such call
  installs `logging.basicConfig`'s handler, and from then on every record of Dagster's own loggers
  is printed twice (by their handler and by root's) for the rest of the process's life.
- each daemon loop logs a full traceback (over 100 lines of chained psycopg2 and SQLAlchemy frames)
  for every failed iteration, and the same error comes back every few seconds.

Here the root logger gets a handler of its own up front (so `basicConfig` never adds one) that
leaves Dagster's records to Dagster's handler, and records saying a server is unreachable are cut
to one line and repeated at most once per window per logger and message, with a count of what was
left out. Everything else is logged as before.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

# Text that marks a record as "a server is unreachable right now" (PostgreSQL through psycopg,
# psycopg2 or SQLAlchemy; InfluxDB through this project's client).
UNREACHABLE_MARKERS = (
    "Connection refused",
    "could not connect to server",
    "too many retries for DB connection",
    "server closed the connection unexpectedly",
    "the database system is shutting down",
    "the database system is starting up",
    "the database system is in recovery mode",
    "terminating connection due to administrator command",
    "Connection reset by peer",
    "cannot reach InfluxDB",
)
REPEAT_WINDOW_S = 60.0
LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"


@dataclass
class _Seen:
    since: float
    suppressed: int = 0


class OutageThrottle(logging.Filter):
    """Shortens records about unreachable servers to one line and lets one through per window."""

    def __init__(
        self, window_s: float = REPEAT_WINDOW_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.window_s = window_s
        self.clock = clock
        self._seen: dict[tuple[str, str], _Seen] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a repeat within the window; otherwise True, the record cut to one line."""
        if record.levelno < logging.WARNING:
            return True
        text = _full_text(record)
        cause = next((line for line in _lines(text) if _unreachable(line)), None)
        if cause is None:
            return True
        template = str(record.msg).strip().splitlines()[0] if str(record.msg).strip() else ""
        key = (record.name, template)
        now = self.clock()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now - seen.since < self.window_s:
                seen.suppressed += 1
                return False
            self._seen[key] = _Seen(since=now)
        headline = next(iter(_lines(record.getMessage())), "")
        summary = cause if headline == cause or not headline else f"{headline} {cause}"
        note = f"; {seen.suppressed} similar records left out" if seen and seen.suppressed else ""
        record.msg = (
            f"{summary} [server unreachable: repeats shown once per {self.window_s:.0f}s{note}]"
        )
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return True


def _full_text(record: logging.LogRecord) -> str:
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        text += "\n" + "".join(str(e) + "\n" for e in _chain(record.exc_info[1]))
    return text


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in out:
        out.append(current)
        current = current.__cause__ or current.__context__
    return out


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _unreachable(line: str) -> bool:
    return any(marker in line for marker in UNREACHABLE_MARKERS)


class _NotDagster(logging.Filter):
    """Dagster's loggers have their own handler: the root handler must not print them again."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "dagster" or record.name.startswith("dagster."))


def install(throttle: OutageThrottle | None = None) -> OutageThrottle:
    """Throttle outage records on every logger created from now on and give root a handler."""
    active = throttle or OutageThrottle()

    class ThrottledLogger(logging.Logger):
        def handle(self, record: logging.LogRecord) -> None:
            if active.filter(record):
                super().handle(record)

    logging.setLoggerClass(ThrottledLogger)
    root = logging.getLogger()
    root.addFilter(active)  # records logged on root itself, e.g. `logging.warning(...)`
    handler = logging.StreamHandler(sys.stdout)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, "%Y-%m-%d %H:%M:%S %z"))
    handler.addFilter(_NotDagster())
    root.addHandler(handler)
    return active


def set_sensor_loop(seconds: float) -> None:
    """Make Dagster's sensor daemon start a loop every `seconds` (its own floor is 5 s)."""
    from dagster._daemon import sensor

    # A private constant: fail loudly (not silently slower) if a Dagster release renames it.
    if not isinstance(getattr(sensor, "MIN_INTERVAL_LOOP_TIME", None), int | float):
        raise RuntimeError(
            "dagster._daemon.sensor.MIN_INTERVAL_LOOP_TIME is gone in this Dagster release: "
            "find how its sensor daemon paces its loop before upgrading"
        )
    sensor.MIN_INTERVAL_LOOP_TIME = seconds  # type: ignore[assignment]


def sensor_loop_seconds(env: Mapping[str, str]) -> float:
    """ENERGY_SENSOR_LOOP_SECONDS (default 1), between 0.2 and 5 seconds."""
    raw = env.get("ENERGY_SENSOR_LOOP_SECONDS") or "1"
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0.2 <= seconds <= 5:
        raise SystemExit(f"ENERGY_SENSOR_LOOP_SECONDS must be between 0.2 and 5, got {raw!r}")
    return seconds


def main() -> int:
    """`python -m energy_pipeline.daemon run -w …`: dagster-daemon, faster sensors, throttled
    outage logging."""
    seconds = sensor_loop_seconds(os.environ)
    install()
    # Imported after install(): loggers created at import time get the throttle too.
    from dagster._daemon.cli import main as daemon_main

    set_sensor_loop(seconds)

    sys.argv[0] = "dagster-daemon"
    daemon_main()  # a click command: exits through SystemExit
    return 0


if __name__ == "__main__":
    sys.exit(main())
