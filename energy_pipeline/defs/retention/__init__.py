"""The retention domain: a daily job removing what is past its horizon, in PostgreSQL and in
Dagster's own storage."""

import dagster as dg

from energy_pipeline.config import Settings
from energy_pipeline.defs.retention.assets import RetentionSettings, retention
from energy_pipeline.defs.retention.schedules import retention_job, retention_schedule


def build_defs(settings: Settings) -> dg.Definitions:
    """The `retention` asset, its daily schedule and its settings; needs the `postgres`
    resource from the definitions it is merged into."""
    return dg.Definitions(
        assets=[retention],
        jobs=[retention_job],
        schedules=[retention_schedule],
        resources={
            "retention_settings": RetentionSettings(
                retention_device_rollup_1m_days=settings.retention_device_rollup_1m_days,
                retention_household_rollup_5m_days=settings.retention_household_rollup_5m_days,
                retention_device_rollup_1h_days=settings.retention_device_rollup_1h_days,
                retention_daily_report_days=settings.retention_daily_report_days,
                retention_quarantine_days=settings.retention_quarantine_days,
                retention_alerts_days=settings.retention_alerts_days,
                lateness_seconds=settings.lateness_seconds,
                raw_retention_days=settings.raw_retention_days,
            )
        },
    )
