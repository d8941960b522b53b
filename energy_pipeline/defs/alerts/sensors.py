"""The slow path of alert delivery: a sensor that retries due outbox rows between runs."""

from __future__ import annotations

import json

import dagster as dg

from energy_pipeline.alerts.delivery import MAX_ATTEMPTS, DeliveryStats, deliver_pending
from energy_pipeline.defs.alerts.resources import AlertChannelsResource
from energy_pipeline.defs.runs import utcnow  # a module name tests can replace
from energy_pipeline.resources import PostgresResource

# Stop claiming rows after this long, well inside the daemon's 60 s sensor evaluation timeout;
# the next tick goes on where this one stopped.
TICK_BUDGET_S = 40.0
COUNTERS = ("delivered", "retried", "dead_lettered")


def next_cursor(cursor: str | None, stats: DeliveryStats) -> str:
    """The running totals of every tick so far, with this tick's counts added."""
    try:
        totals = {k: int(v) for k, v in json.loads(cursor or "{}").items() if k in COUNTERS}
    except (ValueError, AttributeError):
        totals = {}  # an unreadable cursor restarts the totals; it decides nothing else
    for key in COUNTERS:
        totals[key] = totals.get(key, 0) + getattr(stats, key)
    return json.dumps(totals, sort_keys=True)


@dg.sensor(
    name="alert_delivery_sensor",
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Delivers due alert notifications (retries with backoff); launches no runs.",
)
def alert_delivery_sensor(
    context: dg.SensorEvaluationContext,
    postgres: PostgresResource,
    alert_channels: AlertChannelsResource,
) -> dg.SensorResult:
    """Sends every due outbox row once, logs dead letters, reports the counts."""
    with postgres.connect() as conn:
        stats = deliver_pending(
            conn,
            alert_channels.channels(),
            utcnow(),
            log=context.log,
            max_attempts=MAX_ATTEMPTS,
            time_budget_s=TICK_BUDGET_S,
        )
    return dg.SensorResult(
        skip_reason=f"alert outbox: {stats.describe()}",
        cursor=next_cursor(context.cursor, stats),
    )
