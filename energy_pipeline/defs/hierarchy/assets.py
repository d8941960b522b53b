"""Dagster assets: household × 5 minutes and device × hour, computed from the minute rollups."""

from datetime import UTC, datetime

import dagster as dg

from energy_pipeline.defs.hierarchy.partitions import (
    FIVE_MINUTE_PARTITIONS,
    HOURLY_PARTITIONS,
    MINUTES_IN_WINDOW,
)
from energy_pipeline.hierarchy import DEVICE_1H, HOUSEHOLD_5M, replace_windows
from energy_pipeline.resources import PostgresResource
from energy_pipeline.scheduling import PARTITION_FMT

HIERARCHY_GROUP = "hierarchy"
MINUTE_ROLLUP = dg.AssetKey("device_rollup_1m")


def _materialize(
    context: dg.AssetExecutionContext, postgres: PostgresResource, grain: str
) -> dg.MaterializeResult:
    window = context.partition_time_window
    start, end = window.start.astimezone(UTC), window.end.astimezone(UTC)
    began = datetime.now(UTC)
    with postgres.connect() as conn:
        written = replace_windows(conn, grain, start, end, began)
    seconds = (datetime.now(UTC) - began).total_seconds()
    # A ranged run's result lands on every window it covers: each window gets its own figures
    # instead, so per-partition plots show windows, not run totals.
    expected = written.minutes_expected // max(written.windows, 1)
    for bucket, (rows, covered) in written.per_window.items():
        context.add_asset_metadata(
            {"rows_written": rows, "minutes_covered": covered, "minutes_expected": expected},
            partition_key=bucket.astimezone(UTC).strftime(PARTITION_FMT),
        )
    metadata = {
        "run_window_start": start.isoformat(),
        "run_window_end": end.isoformat(),
        "run_windows": written.windows,
        "run_rows_written": written.rows_written,
        "run_seconds": round(seconds, 3),
        "run_lag_seconds": round((datetime.now(UTC) - end).total_seconds(), 1),
    }
    if written.minutes_covered < written.minutes_expected:
        context.log.warning(
            f"{grain} {start:%Y-%m-%d %H:%M}..{end:%H:%M}: {written.minutes_covered} of "
            f"{written.minutes_expected} minutes were rolled up"
        )
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(
    name=HOUSEHOLD_5M,
    group_name=HIERARCHY_GROUP,
    partitions_def=FIVE_MINUTE_PARTITIONS,
    deps=[dg.AssetDep(MINUTE_ROLLUP, partition_mapping=MINUTES_IN_WINDOW)],
    backfill_policy=dg.BackfillPolicy.single_run(),
    kinds={"postgres"},
)
def household_rollup_5m(
    context: dg.AssetExecutionContext, postgres: PostgresResource
) -> dg.MaterializeResult:
    """Household × 5-minute energy and total draw in `energy.household_rollup_5m`."""
    return _materialize(context, postgres, HOUSEHOLD_5M)


@dg.asset(
    name=DEVICE_1H,
    group_name=HIERARCHY_GROUP,
    partitions_def=HOURLY_PARTITIONS,
    deps=[dg.AssetDep(MINUTE_ROLLUP, partition_mapping=MINUTES_IN_WINDOW)],
    backfill_policy=dg.BackfillPolicy.single_run(),
    kinds={"postgres"},
)
def device_rollup_1h(
    context: dg.AssetExecutionContext, postgres: PostgresResource
) -> dg.MaterializeResult:
    """Device × hour rollups in `energy.device_rollup_1h`."""
    return _materialize(context, postgres, DEVICE_1H)
