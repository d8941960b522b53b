"""Retention of the `energy` schema: which data is past its horizon, and removing it.

Day-partitioned tables lose whole day partitions (DETACH CONCURRENTLY, then DROP, with their ledger
rows in the same transaction as the DROP); smaller tables lose rows in batches. Nothing newer than
the lateness window is ever removed, whatever the horizon says. The rollup tables' last finished
days are vacuumed, so index-only reads of them stop visiting the heap. No Dagster here.
"""

from energy_pipeline.retention.catalog import DayPartition, day_partitions, partition_visibility
from energy_pipeline.retention.plan import (
    DAY,
    PARTITIONED_TABLES,
    VACUUM_DAYS,
    Horizon,
    HorizonSettings,
    PartitionVacuum,
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
    vacuum_days,
    validate_horizons,
)
from energy_pipeline.retention.postgres import (
    LOCK_TIMEOUT_MS,
    PARTITION_DAYS_AHEAD,
    delete_in_batches,
    drop_day_partition,
    run_retention,
    run_retention_for,
    vacuum_finished_days,
)

__all__ = [
    "DAY",
    "LOCK_TIMEOUT_MS",
    "PARTITIONED_TABLES",
    "PARTITION_DAYS_AHEAD",
    "VACUUM_DAYS",
    "DayPartition",
    "Horizon",
    "HorizonSettings",
    "PartitionVacuum",
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
    "partition_visibility",
    "run_retention",
    "run_retention_for",
    "vacuum_days",
    "vacuum_finished_days",
    "validate_horizons",
]
