"""The per-device minute rollup asset."""

from datetime import UTC, datetime

import dagster as dg

from energy_pipeline.defs.minute_rollups.settings import MinuteRunSettings
from energy_pipeline.ingest import process_window
from energy_pipeline.resources import InfluxDBResource, PostgresResource
from energy_pipeline.scheduling import partition_key

ROLLUP_GROUP = "rollups"
# Each minute's own figures, recorded on that minute's materialization.
PER_MINUTE = {
    "points_read": "points_read",
    "rows_written": "devices",
    "rejected": "rejected",
    "duplicates_dropped": "duplicates_dropped",
    # Devices whose points carried another household than the registry's (data quality).
    "household_mismatches": "household_mismatches",
}


def build_device_rollup_1m(partitions_def: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    """The `device_rollup_1m` asset over the given minute partitions."""

    @dg.asset(
        name="device_rollup_1m",
        group_name=ROLLUP_GROUP,
        partitions_def=partitions_def,
        # Catch-up and backfills run many minutes in one run, at about the cost of reading them.
        backfill_policy=dg.BackfillPolicy.single_run(),
        kinds={"polars", "postgres"},
    )
    def device_rollup_1m(
        context: dg.AssetExecutionContext,
        influxdb: InfluxDBResource,
        postgres: PostgresResource,
        minute_runs: MinuteRunSettings,
    ) -> dg.MaterializeResult:
        """Per-device minute rollups of raw InfluxDB telemetry in `energy.device_rollup_1m`."""
        window = context.partition_time_window
        start, end = window.start.astimezone(UTC), window.end.astimezone(UTC)
        with postgres.connect() as conn:
            stats = process_window(
                influxdb.source(),
                conn,
                start,
                end,
                chunk_minutes=minute_runs.chunk_minutes,
                log=context.log.info,
            )
        if stats.rejected:
            context.log.warning(f"{stats.rejected} points quarantined in energy.quarantine")
        # A ranged run's result lands on every minute it covers: each minute gets its own
        # figures instead, so per-partition plots show minutes, not run totals.
        for row in stats.per_minute.iter_rows(named=True):
            context.add_asset_metadata(
                {name: int(row[column]) for name, column in PER_MINUTE.items()},
                partition_key=partition_key(row["bucket"]),
            )
        lag_s = (datetime.now(UTC) - end).total_seconds()
        return dg.MaterializeResult(
            metadata={
                "run_window_start": start.isoformat(),
                "run_window_end": end.isoformat(),
                "run_minutes": stats.per_minute.height,
                "run_queries": stats.queries,
                **{f"run_seconds_{k}": round(v, 3) for k, v in stats.seconds.items()},
                "run_seconds_in_asset": round(sum(stats.seconds.values()), 3),
                "run_lag_seconds": round(lag_s, 1),
            }
        )

    return device_rollup_1m
