"""Alert delivery's part of the alerts domain: the retry sensor (the channels are a resource,
`alert_channels`, from `definitions.build_resources`)."""

import dagster as dg

from energy_pipeline.defs.alerts.sensors import alert_delivery_sensor

SENSORS = [alert_delivery_sensor]


def build_defs() -> dg.Definitions:
    """The delivery sensor; needs the `postgres` and `alert_channels` resources."""
    return dg.Definitions(sensors=SENSORS)
