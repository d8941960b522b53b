"""Partitions of the hierarchy: UTC 5-minute windows and hours, from a fixed start."""

from datetime import UTC, datetime

import dagster as dg

PARTITION_FMT = "%Y-%m-%d-%H:%M"
# Fixed, not rolling like the minutes: coarse partitions are few (288 and 24 a day), and a fixed
# start keeps every computed window addressable in the UI. 2026-09-01 precedes the oldest minute
# the pipeline can hold when the hierarchy ships (ENERGY_RAW_RETENTION_DAYS is at most 65).
# The 5-minute set passes Dagster's advised 100,000 partitions in 2027-08: the retention work moves
# this start forward before then.
HIERARCHY_START = datetime(2026, 9, 1, tzinfo=UTC)

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
