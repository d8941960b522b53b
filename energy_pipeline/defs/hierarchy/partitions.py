"""Partitions of the hierarchy: UTC 5-minute windows and hours over the last 300 days."""

from datetime import UTC, datetime

import dagster as dg

from energy_pipeline.scheduling import PARTITION_FMT, partitions_start

# Precedes the oldest minute the pipeline could hold when the hierarchy shipped
# (ENERGY_RAW_RETENTION_DAYS is at most 65).
HIERARCHY_FIRST_DAY = datetime(2026, 9, 1, tzinfo=UTC)
# How far back coarse windows stay addressable in Dagster: 301 days of 5-minute windows is 86,688
# partitions, under Dagster's advised 100,000 per asset (366 days would pass it). Older rows stay
# in PostgreSQL until retention drops them; they only leave the UI's partition list.
HIERARCHY_DAYS = 300


def hierarchy_start(now: datetime) -> datetime:
    """First 5-minute and hourly partition: UTC midnight `HIERARCHY_DAYS` before `now`, never
    before `HIERARCHY_FIRST_DAY`. Moves only at UTC midnight, like the minute partitions."""
    return max(HIERARCHY_FIRST_DAY, partitions_start(now, HIERARCHY_DAYS))


# Module constants, evaluated when the code location loads: the daemon loads it again every
# minute and the partition window sensor has the webserver reload it after UTC midnight, so the
# start keeps moving on a deployment that is never reloaded by hand (docs/design.md).
HIERARCHY_START = hierarchy_start(datetime.now(UTC))

FIVE_MINUTE_PARTITIONS = dg.TimeWindowPartitionsDefinition(
    cron_schedule="*/5 * * * *",
    start=HIERARCHY_START,
    fmt=PARTITION_FMT,
    timezone="UTC",
)
HOURLY_PARTITIONS = dg.TimeWindowPartitionsDefinition(
    cron_schedule="0 * * * *",
    start=HIERARCHY_START,
    fmt=PARTITION_FMT,
    timezone="UTC",
)
# Each coarse window depends on the minute partitions inside it. The minute partitions start at a
# rolling point (raw-data retention), so older coarse windows map to minutes that no longer exist.
MINUTES_IN_WINDOW = dg.TimeWindowPartitionMapping(allow_nonexistent_upstream_partitions=True)
