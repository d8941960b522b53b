"""The daily retention job and its schedule."""

import dagster as dg

from energy_pipeline.defs.retention.assets import retention

retention_job = dg.define_asset_job(
    "retention_job",
    selection=[retention],
    # One run a day: a long removal must not be failed by the sensors' short run timeout.
    tags={"dagster/max_runtime": "3600"},
)

# 03:17 UTC: after the UTC midnight partition moves, off the hour's busy minute.
retention_schedule = dg.ScheduleDefinition(
    name="retention_schedule",
    job=retention_job,
    cron_schedule="17 3 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
