"""Per-partition asset checks of the hierarchy: sums equal the minute rows', minutes covered."""

from collections.abc import Callable
from datetime import UTC

import dagster as dg

from energy_pipeline.defs.hierarchy.assets import device_rollup_1h, household_rollup_5m
from energy_pipeline.defs.hierarchy.partitions import FIVE_MINUTE_PARTITIONS, HOURLY_PARTITIONS
from energy_pipeline.hierarchy import DEVICE_1H, HOUSEHOLD_5M, coverage, sum_checks
from energy_pipeline.resources import PostgresResource

SUMS_MATCH_MINUTES = "sums_match_minutes"
MINUTES_COVERED = "minutes_covered"
# A ranged (catch-up) run records one check result for the whole range, without a partition
# (dagster 1.13): its metadata names the failing windows, at most this many.
LISTED_WINDOWS = 20


def _sums_result(context: dg.AssetCheckExecutionContext, postgres: PostgresResource, grain: str):
    window = context.partition_time_window
    start, end = window.start.astimezone(UTC), window.end.astimezone(UTC)
    with postgres.connect() as conn:
        checks = sum_checks(conn, grain, start, end)
    failed = [c for c in checks if not c.passed]
    metadata: dict = {"windows_checked": len(checks), "windows_failed": len(failed)}
    if len(checks) == 1:
        c = checks[0]
        metadata |= {
            "energy_wh": c.energy_wh,
            "minute_energy_wh": c.minute_energy_wh,
            "sample_count": c.samples,
            "minute_sample_count": c.minute_samples,
        }
    if failed:
        metadata["failed_windows"] = ", ".join(
            f"{c.bucket.astimezone(UTC):%Y-%m-%d %H:%M} (energy_wh {c.energy_wh} vs "
            f"{c.minute_energy_wh}, samples {c.samples} vs {c.minute_samples})"
            for c in failed[:LISTED_WINDOWS]
        )
    return dg.AssetCheckResult(
        passed=not failed, severity=dg.AssetCheckSeverity.ERROR, metadata=metadata
    )


def _coverage_result(
    context: dg.AssetCheckExecutionContext, postgres: PostgresResource, grain: str
):
    window = context.partition_time_window
    start, end = window.start.astimezone(UTC), window.end.astimezone(UTC)
    with postgres.connect() as conn:
        rows = coverage(conn, grain, start, end)
    covered = sum(r.minutes_covered or 0 for r in rows)
    expected = sum(r.minutes_expected for r in rows)
    short = [r for r in rows if not r.complete]
    metadata: dict = {"minutes_covered": covered, "minutes_expected": expected}
    if short:
        metadata["incomplete_windows"] = ", ".join(
            f"{r.bucket.astimezone(UTC):%Y-%m-%d %H:%M} ({r.minutes_covered or 0}/"
            f"{r.minutes_expected})"
            for r in short[:LISTED_WINDOWS]
        )
    return dg.AssetCheckResult(
        passed=not short, severity=dg.AssetCheckSeverity.WARN, metadata=metadata
    )


def _build(
    asset: dg.AssetsDefinition, partitions_def: dg.PartitionsDefinition, grain: str
) -> list[dg.AssetChecksDefinition]:
    def sums(context: dg.AssetCheckExecutionContext, postgres: PostgresResource):
        return _sums_result(context, postgres, grain)

    def covered(context: dg.AssetCheckExecutionContext, postgres: PostgresResource):
        return _coverage_result(context, postgres, grain)

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
