"""The reports domain: each household's local day in `energy.household_daily_report`, the fleet
overview page per day, the kWh check and the sensor that requests due and stale days."""

import dagster as dg

from energy_pipeline.config import Settings
from energy_pipeline.defs.reports.assets import ReportOutputResource, household_daily_report
from energy_pipeline.defs.reports.checks import REPORT_CHECKS
from energy_pipeline.defs.reports.sensors import REPORT_JOB, build_report_sensor
from energy_pipeline.resources import from_settings


def build_defs(settings: Settings) -> dg.Definitions:
    """Asset, check, job and sensor of the reports, and where pages are written
    (`ENERGY_REPORTS_DIR`); needs the `postgres` resource from the definitions it is merged
    into."""
    return dg.Definitions(
        assets=[household_daily_report],
        asset_checks=REPORT_CHECKS,
        jobs=[REPORT_JOB],
        sensors=[build_report_sensor(run_timeout_seconds=settings.run_timeout_seconds)],
        resources={"report_output": from_settings(ReportOutputResource, settings)},
    )
