"""The alerts domain: rules evaluated as per-partition asset checks on the minute and 5-minute
rollups, in the runs that materialize them, with blocking contract checks; delivery's retry
sensor is in `delivery_defs`."""

from datetime import datetime

import dagster as dg

from energy_pipeline.defs.alerts.checks import build_checks
from energy_pipeline.defs.minute_rollups.partitions import build_minute_partitions


def build_defs(now: datetime, raw_retention_days: int) -> dg.Definitions:
    """The alert and contract checks; the minute partitions as of `now` match the minute
    asset's (built from the same arguments). Needs the `postgres` and `alert_channels`
    resources and the rollup assets from the definitions it is merged into."""
    return dg.Definitions(
        asset_checks=build_checks(build_minute_partitions(now, raw_retention_days))
    )
