"""The retention domain: a daily job removing what is past its horizon, in PostgreSQL and in
Dagster's own storage."""

import dagster as dg

from energy_pipeline.config import Settings
from energy_pipeline.defs.retention.assets import RetentionSettings, retention
from energy_pipeline.defs.retention.schedules import retention_job, retention_schedule
from energy_pipeline.resources import from_settings


def build_defs(settings: Settings) -> dg.Definitions:
    """The `retention` asset, its daily schedule and its settings; needs the `postgres`
    resource from the definitions it is merged into."""
    return dg.Definitions(
        assets=[retention],
        jobs=[retention_job],
        schedules=[retention_schedule],
        resources={
            "retention_settings": from_settings(RetentionSettings, settings),
        },
    )
