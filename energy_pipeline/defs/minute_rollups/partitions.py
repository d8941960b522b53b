"""Minute partitions: UTC minutes over the raw-data retention window."""

from datetime import datetime

import dagster as dg

from energy_pipeline.scheduling import PARTITION_FMT, partitions_start


def build_minute_partitions(
    now: datetime, retention_days: int
) -> dg.TimeWindowPartitionsDefinition:
    """UTC minute partitions covering the raw-data retention window up to the last closed minute."""
    return dg.TimeWindowPartitionsDefinition(
        cron_schedule="* * * * *",
        start=partitions_start(now, retention_days),
        fmt=PARTITION_FMT,
        timezone="UTC",
    )
