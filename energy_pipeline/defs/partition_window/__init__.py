"""Partition window: keeps the webserver's partitions as current as the daemon's.

Partition starts (minute and hierarchy) are computed from the clock when the code location
loads. `dagster-daemon` starts a fresh code server for each location every 60 s, so its sensors
and backfills follow the clock; the webserver loads a location once and keeps it until it is
reloaded. This domain's sensor reloads it there once a day, after the starts move at UTC midnight.
"""

from collections.abc import Sequence

import dagster as dg

from energy_pipeline.config import Settings
from energy_pipeline.defs.partition_window.sensors import (
    DagsterWebserverResource,
    build_partition_window_sensor,
)
from energy_pipeline.resources import from_settings


def build_defs(domains: Sequence[dg.Definitions], settings: Settings) -> dg.Definitions:
    """The sensor watching every time-partitioned asset of `domains`, and its webserver client
    (`DAGSTER_WEBSERVER_URL`)."""
    watched = {
        asset.key: asset.partitions_def
        for domain in domains
        for asset in domain.assets or []
        if isinstance(asset, dg.AssetsDefinition)
        and isinstance(asset.partitions_def, dg.TimeWindowPartitionsDefinition)
    }
    webserver = from_settings(DagsterWebserverResource, settings, "webserver_")
    return dg.Definitions(
        sensors=[build_partition_window_sensor(watched)],
        resources={"dagster_webserver": webserver},
    )
