"""Which minutes to request when: pure time arithmetic for the sensors (no Dagster here)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta

MINUTE = timedelta(minutes=1)
PARTITION_FMT = "%Y-%m-%d-%H:%M"


def floor_minute(ts: datetime) -> datetime:
    return ts.astimezone(UTC).replace(second=0, microsecond=0)


def partition_key(minute: datetime) -> str:
    return minute.astimezone(UTC).strftime(PARTITION_FMT)


def parse_partition_key(key: str) -> datetime:
    return datetime.strptime(key, PARTITION_FMT).replace(tzinfo=UTC)


def partitions_start(now: datetime, retention_days: int) -> datetime:
    """First minute partition: the start of the UTC day `retention_days` before now.

    Keeping the set to the raw-data retention window bounds it to (retention_days + 1) * 1440
    partitions, well under Dagster's advised 100,000 per asset, as long as the code is loaded
    again each day: the start moves only at UTC midnight, and only when the code location
    reloads (see `stale_partition_starts` and docs/design.md, "Partition window").
    """
    day = (now.astimezone(UTC) - timedelta(days=retention_days)).date()
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def newest_due_minute(now: datetime, settle_seconds: int) -> datetime:
    """Start of the newest minute that has closed and settled for `settle_seconds`."""
    return floor_minute(now - timedelta(seconds=settle_seconds)) - MINUTE


def minutes_between(first: datetime, last: datetime) -> list[datetime]:
    """Every minute start from first to last, inclusive."""
    out, m = [], first
    while m <= last:
        out.append(m)
        m += MINUTE
    return out


def contiguous_ranges(minutes: Iterable[datetime], max_len: int) -> list[tuple[datetime, datetime]]:
    """Group minute starts into inclusive (first, last) runs of consecutive minutes, each at most
    `max_len` long."""
    ranges: list[tuple[datetime, datetime]] = []
    for m in sorted(set(minutes)):
        if ranges:
            first, last = ranges[-1]
            if m - last == MINUTE and (m - first) // MINUTE < max_len:
                ranges[-1] = (first, m)
                continue
        ranges.append((m, m))
    return ranges


def new_minutes(
    last_requested: datetime | None, newest_due: datetime, earliest: datetime
) -> list[datetime]:
    """Minutes not requested yet: after the cursor (or just the newest one on a first start)."""
    first = newest_due if last_requested is None else last_requested + MINUTE
    return minutes_between(max(first, earliest), newest_due)


def stale_partition_starts(
    shown: Mapping[str, datetime | None], current: Mapping[str, datetime]
) -> list[str]:
    """Assets whose first partition, as another process shows it (`shown`), precedes the start of
    the partitions built from the clock now (`current`): that process loaded the code on an
    earlier day and must reload it. An asset it does not show (None) is not stale."""
    return sorted(
        name for name, start in current.items() if (s := shown.get(name)) is not None and s < start
    )
