"""Per-partition check of the daily reports: each row's kWh equals the sum of its 5-minute rows."""

from collections.abc import Iterator

import dagster as dg

from energy_pipeline.defs.reports.assets import days_of, household_daily_report
from energy_pipeline.defs.reports.partitions import DAILY_REPORT_PARTITIONS, PARTITION_FMT
from energy_pipeline.reports.compute import kwh_checks, unreported_households
from energy_pipeline.resources import PostgresResource

KWH_MATCHES_FIVE_MINUTE_ROWS = "kwh_matches_five_minute_rows"
MAX_LISTED = 20


@dg.asset_check(  # type: ignore[arg-type]  # yields one evaluation per day, see below
    asset=household_daily_report,
    name=KWH_MATCHES_FIVE_MINUTE_ROWS,
    partitions_def=DAILY_REPORT_PARTITIONS,
    blocking=True,
    description="Every household's kWh of the day equals the sum of its 5-minute rows, and "
    "every household with 5-minute rows in its day has a report row.",
)
def kwh_matches_five_minute_rows(
    context: dg.AssetCheckExecutionContext, postgres: PostgresResource
) -> Iterator[dg.AssetCheckEvaluation | dg.Output]:
    """One evaluation per day of the run, each with its partition (a ranged run's single
    result would be recorded without one), then the step's output."""
    with postgres.connect() as conn:
        for day in days_of(context):
            checks = kwh_checks(conn, day)
            mismatched = [c for c in checks if not c.passed]
            missing = unreported_households(conn, day)
            yield dg.AssetCheckEvaluation(
                asset_key=household_daily_report.key,
                check_name=KWH_MATCHES_FIVE_MINUTE_ROWS,
                passed=not mismatched and not missing,
                metadata={
                    "households_checked": len(checks),
                    "mismatched": len(mismatched),
                    "missing_rows": len(missing),
                    "first_mismatches": ", ".join(
                        f"{c.household_id}: {c.energy_kwh:.6f} vs {c.five_minute_kwh:.6f} kWh"
                        for c in mismatched[:MAX_LISTED]
                    ),
                    "first_missing": ", ".join(missing[:MAX_LISTED]),
                    "relative_tolerance": 1e-9,
                },
                severity=dg.AssetCheckSeverity.ERROR,
                blocking=True,
                partition=day.strftime(PARTITION_FMT),
            )
    yield dg.Output(None)


REPORT_CHECKS = [kwh_matches_five_minute_rows]
