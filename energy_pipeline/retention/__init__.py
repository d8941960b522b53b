"""Retention of the `energy` schema: which data is past its horizon, and removing it.

Day-partitioned tables lose whole day partitions (DETACH CONCURRENTLY, then DROP, with their ledger
rows in the same transaction as the DROP); smaller tables lose rows in batches. Nothing newer than
the lateness window is ever removed, whatever the horizon says. No Dagster here.
"""

from energy_pipeline.retention.catalog import DayPartition, day_partitions
from energy_pipeline.retention.plan import (
    DAY,
    PARTITIONED_TABLES,
    Horizon,
    HorizonSettings,
    RetentionBounds,
    RetentionError,
    RetentionReport,
    TableReport,
    cutoff,
    day_start,
    expired_days,
    format_report,
    horizons,
    minute_window_days,
    validate_horizons,
)
from energy_pipeline.retention.postgres import (
    LOCK_TIMEOUT_MS,
    PARTITION_DAYS_AHEAD,
    delete_in_batches,
    drop_day_partition,
    run_retention,
    run_retention_for,
)

__all__ = [
    "DAY",
    "LOCK_TIMEOUT_MS",
    "PARTITIONED_TABLES",
    "PARTITION_DAYS_AHEAD",
    "DayPartition",
    "Horizon",
    "HorizonSettings",
    "RetentionBounds",
    "RetentionError",
    "RetentionReport",
    "TableReport",
    "cutoff",
    "day_partitions",
    "day_start",
    "delete_in_batches",
    "drop_day_partition",
    "expired_days",
    "format_report",
    "horizons",
    "minute_window_days",
    "run_retention",
    "run_retention_for",
    "validate_horizons",
]
