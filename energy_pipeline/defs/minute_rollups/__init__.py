"""Minute rollups: raw points of each closed minute → `energy.device_rollup_1m`.

The asset reads a window of minutes from InfluxDB and replaces them in PostgreSQL; sensors request
each minute once it has settled, repair minutes without a ledger row, and recompute minutes whose
raw data changed later.
"""

from datetime import datetime

import dagster as dg

from energy_pipeline.defs.minute_rollups.assets import build_device_rollup_1m
from energy_pipeline.defs.minute_rollups.partitions import build_minute_partitions
from energy_pipeline.defs.minute_rollups.sensors import (
    build_late_data_sensor,
    build_minute_rollup_sensor,
)


def build_defs(now: datetime, raw_retention_days: int) -> dg.Definitions:
    """The minute asset and its sensors, over minute partitions as of `now`."""
    partitions = build_minute_partitions(now, raw_retention_days)
    asset = build_device_rollup_1m(partitions)
    return dg.Definitions(
        assets=[asset],
        sensors=[
            build_minute_rollup_sensor(asset, partitions),
            build_late_data_sensor(asset, partitions),
        ],
    )
