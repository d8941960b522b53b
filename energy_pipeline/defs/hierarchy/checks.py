"""Per-partition asset checks of the hierarchy: sums equal the minute rows', minutes covered."""

from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import dagster as dg
import psycopg

from energy_pipeline.defs.hierarchy.assets import device_rollup_1h, household_rollup_5m
from energy_pipeline.defs.hierarchy.partitions import FIVE_MINUTE_PARTITIONS, HOURLY_PARTITIONS
from energy_pipeline.hierarchy import (
    DEVICE_1H,
    HOUSEHOLD_5M,
    Coverage,
    SumCheck,
    coverage,
    sum_checks,
)
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


def _sums_verdict(c: SumCheck) -> tuple[datetime, bool, dict]:
    return (
        c.bucket,
        c.passed,
        {
            "energy_wh": c.energy_wh,
            "minute_energy_wh": c.minute_energy_wh,
            "sample_count": c.samples,
            "minute_sample_count": c.minute_samples,
        },
    )


def _coverage_verdict(r: Coverage) -> tuple[datetime, bool, dict]:
    return (
        r.bucket,
        r.complete,
        {"minutes_covered": r.minutes_covered or 0, "minutes_expected": r.minutes_expected},
    )


def _evaluations(
    context: dg.AssetCheckExecutionContext,
    postgres: PostgresResource,
    asset: dg.AssetsDefinition,
    partitions_def: dg.TimeWindowPartitionsDefinition,
    check: str,
    rows: Callable[[psycopg.Connection], Sequence[Any]],
    verdict: Callable[[Any], tuple[datetime, bool, dict]],
) -> Iterator[dg.AssetCheckEvaluation | dg.Output]:
    """One evaluation per window of the run, with its partition; then the step's output."""
    blocking = check == SUMS_MATCH_MINUTES
    with postgres.connect() as conn:
        found = rows(conn)
    for row in found:
        bucket, passed, metadata = verdict(row)
        yield dg.AssetCheckEvaluation(
            asset_key=asset.key,
            check_name=check,
            passed=passed,
            metadata=metadata,
            severity=dg.AssetCheckSeverity.ERROR if blocking else dg.AssetCheckSeverity.WARN,
            blocking=blocking,
            partition=partitions_def.get_partition_key_for_timestamp(bucket.timestamp()),
        )
    yield dg.Output(None)


def _build(
    asset: dg.AssetsDefinition, partitions_def: dg.TimeWindowPartitionsDefinition, grain: str
) -> list[dg.AssetChecksDefinition]:
    def sums(context: dg.AssetCheckExecutionContext, postgres: PostgresResource):
        yield from _evaluations(
            context, postgres, asset, partitions_def, SUMS_MATCH_MINUTES,
            lambda conn: sum_checks(conn, grain, *_window(context)), _sums_verdict,
        )  # fmt: skip

    def covered(context: dg.AssetCheckExecutionContext, postgres: PostgresResource):
        yield from _evaluations(
            context, postgres, asset, partitions_def, MINUTES_COVERED,
            lambda conn: coverage(conn, grain, *_window(context)), _coverage_verdict,
        )  # fmt: skip

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
