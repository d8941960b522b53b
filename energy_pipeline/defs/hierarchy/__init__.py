"""The hierarchy domain: household × 5 minutes and device × hour, from the minute rollups."""

import dagster as dg

from energy_pipeline.defs.hierarchy.assets import device_rollup_1h, household_rollup_5m
from energy_pipeline.defs.hierarchy.checks import HIERARCHY_CHECKS
from energy_pipeline.defs.hierarchy.sensors import JOBS, build_hierarchy_sensor


def build_defs(lateness_seconds: int = 7200, run_timeout_seconds: int = 900) -> dg.Definitions:
    """Assets, checks and the sensor of the hierarchy; needs the `postgres` resource and the
    `device_rollup_1m` asset from the definitions it is merged into."""
    return dg.Definitions(
        assets=[household_rollup_5m, device_rollup_1h],
        asset_checks=HIERARCHY_CHECKS,
        jobs=list(JOBS.values()),
        sensors=[
            build_hierarchy_sensor(
                lateness_seconds=lateness_seconds, run_timeout_seconds=run_timeout_seconds
            )
        ],
    )
