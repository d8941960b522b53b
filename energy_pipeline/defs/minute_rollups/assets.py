"""Dagster assets: the per-device minute rollup."""

from datetime import UTC, datetime

import dagster as dg

from energy_pipeline.ingest import process_window
from energy_pipeline.resources import InfluxDBResource, PostgresResource, RollupSettings
from energy_pipeline.scheduling import PARTITION_FMT, partitions_start

ROLLUP_GROUP = "rollups"


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
        rollup_settings: RollupSettings,
    ) -> dg.MaterializeResult:
        """Per-device minute rollups of raw InfluxDB telemetry in `energy.device_rollup_1m`."""
        window = context.partition_time_window
        start, end = window.start.astimezone(UTC), window.end.astimezone(UTC)
        with postgres.connect() as conn:
            stats = process_window(
                influxdb.client(),
                conn,
                influxdb.measurement,
                start,
                end,
                chunk_minutes=rollup_settings.chunk_minutes,
                read_parallelism=rollup_settings.read_parallelism,
                log=context.log.info,
            )
        lag_s = (datetime.now(UTC) - end).total_seconds()
        in_asset = sum(stats.seconds.values())
        if stats.rejected:
            context.log.warning(f"{stats.rejected} points quarantined in energy.quarantine")
        return dg.MaterializeResult(
            metadata={
                "window_start": start.isoformat(),
                "window_end": end.isoformat(),
                "minutes": int((end - start).total_seconds() // 60),
                "points_read": stats.points_read,
                "rows_written": stats.rows_written,
                "rejected": stats.rejected,
                "duplicates_dropped": stats.duplicates_dropped,
                "queries": stats.queries,
                **{f"seconds_{k}": round(v, 3) for k, v in stats.seconds.items()},
                "seconds_in_asset": round(in_asset, 3),
                "lag_seconds": round(lag_s, 1),
            }
        )

    return device_rollup_1m
