"""Per-partition asset checks of the hierarchy: sums equal the minute rows', minutes covered."""

from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import dagster as dg

from energy_pipeline.defs.hierarchy.assets import device_rollup_1h, household_rollup_5m
from energy_pipeline.defs.hierarchy.partitions import FIVE_MINUTE_PARTITIONS, HOURLY_PARTITIONS
from energy_pipeline.hierarchy import DEVICE_1H, HOUSEHOLD_5M, coverage, sum_checks
from energy_pipeline.resources import PostgresResource

SUMS_MATCH_MINUTES = "sums_match_minutes"
MINUTES_COVERED = "minutes_covered"

# A check returning one AssetCheckResult in a ranged (catch-up) run is recorded once, without a
# partition (dagster 1.13). These checks yield one evaluation per window instead, each with its
# own partition, then the step's (empty) output; yielded, not logged, so a failed blocking check
# still stops what reads from the asset.


def _window(context: dg.AssetCheckExecutionContext) -> tuple[datetime, datetime]:
    window = context.partition_time_window
    return window.start.astimezone(UTC), window.end.astimezone(UTC)


def _evaluation(
    asset: dg.AssetsDefinition,
    check: str,
    partitions_def: dg.TimeWindowPartitionsDefinition,
    bucket: datetime,
    passed: bool,
    blocking: bool,
    metadata: dict,
) -> dg.AssetCheckEvaluation:
    return dg.AssetCheckEvaluation(
        asset_key=asset.key,
        check_name=check,
        passed=passed,
        metadata=metadata,
        severity=dg.AssetCheckSeverity.ERROR if blocking else dg.AssetCheckSeverity.WARN,
        blocking=blocking,
        partition=partitions_def.get_partition_key_for_timestamp(bucket.timestamp()),
    )


def _sums(
    context: dg.AssetCheckExecutionContext,
    postgres: PostgresResource,
    asset: dg.AssetsDefinition,
    partitions_def: dg.TimeWindowPartitionsDefinition,
    grain: str,
) -> Iterator[dg.AssetCheckEvaluation | dg.Output]:
    with postgres.connect() as conn:
        checks = sum_checks(conn, grain, *_window(context))
    for c in checks:
        yield _evaluation(
            asset,
            SUMS_MATCH_MINUTES,
            partitions_def,
            c.bucket,
            c.passed,
            blocking=True,
            metadata={
                "energy_wh": c.energy_wh,
                "minute_energy_wh": c.minute_energy_wh,
                "sample_count": c.samples,
                "minute_sample_count": c.minute_samples,
            },
        )
    yield dg.Output(None)


def _covered(
    context: dg.AssetCheckExecutionContext,
    postgres: PostgresResource,
    asset: dg.AssetsDefinition,
    partitions_def: dg.TimeWindowPartitionsDefinition,
    grain: str,
) -> Iterator[dg.AssetCheckEvaluation | dg.Output]:
    with postgres.connect() as conn:
        rows = coverage(conn, grain, *_window(context))
    for r in rows:
        yield _evaluation(
            asset,
            MINUTES_COVERED,
            partitions_def,
            r.bucket,
            r.complete,
            blocking=False,
            metadata={
                "minutes_covered": r.minutes_covered or 0,
                "minutes_expected": r.minutes_expected,
            },
        )
    yield dg.Output(None)


def _build(
    asset: dg.AssetsDefinition, partitions_def: dg.TimeWindowPartitionsDefinition, grain: str
) -> list[dg.AssetChecksDefinition]:
    def sums(context: dg.AssetCheckExecutionContext, postgres: PostgresResource):
        yield from _sums(context, postgres, asset, partitions_def, grain)

    def covered(context: dg.AssetCheckExecutionContext, postgres: PostgresResource):
        yield from _covered(context, postgres, asset, partitions_def, grain)

    decorate: Callable = dg.asset_check(
        asset=asset,
        name=SUMS_MATCH_MINUTES,
        partitions_def=partitions_def,
        blocking=True,
        description=f"Energy and sample sums of each {grain} window equal its minute rows'.",
    )
    decorate_coverage: Callable = dg.asset_check(
        asset=asset,
        name=MINUTES_COVERED,
        partitions_def=partitions_def,
        description=f"Each {grain} window was computed with all of its minutes in the ledger.",
    )
    return [decorate(sums), decorate_coverage(covered)]


HIERARCHY_CHECKS = [
    *_build(household_rollup_5m, FIVE_MINUTE_PARTITIONS, HOUSEHOLD_5M),
    *_build(device_rollup_1h, HOURLY_PARTITIONS, DEVICE_1H),
]
