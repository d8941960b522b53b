"""Partitions of the daily reports: one per local day, named by its date."""

import dagster as dg

# Reports are kept forever by default (retention deletes rows older than
# ENERGY_RETENTION_DAILY_REPORT_DAYS only when it is above 0, and then leaves the partitions
# here), so their partitions start at a fixed day: one a day stays far under Dagster's advised
# 100,000 per asset for centuries. Days before the rollups hold data simply
# report no data.
REPORT_FIRST_DAY = "2026-01-01"
PARTITION_FMT = "%Y-%m-%d"

# A partition key D names every household's own local day D. Dagster adds D once the UTC day D
# has ended; the sensor requests it once the last zone's day D has closed (D+1 12:00 UTC).
DAILY_REPORT_PARTITIONS = dg.DailyPartitionsDefinition(
    start_date=REPORT_FIRST_DAY, timezone="UTC", fmt=PARTITION_FMT
)
# Lineage only: a day reads 5-minute and hourly windows beyond its UTC day (other zones, and
# the trailing week), which the sensor tracks itself; older upstream windows may be gone.
UPSTREAM_WINDOWS = dg.TimeWindowPartitionMapping(allow_nonexistent_upstream_partitions=True)
