"""Run-state helpers the planner-driven sensors share: the tag naming the sensor that requested a
run, the run statuses counted as in flight or failed, and UTC clock readings."""

from datetime import UTC, datetime

import dagster as dg

ORIGIN_TAG = "energy/origin"
IN_FLIGHT = [
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]
FAILED = [dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]


def utcnow() -> datetime:
    return datetime.now(UTC)


def run_time(ts: float | datetime | None) -> datetime | None:
    """A run record's timestamp (epoch seconds or datetime, naive meaning UTC) as a UTC datetime."""
    if ts is None:
        return None
    if isinstance(ts, datetime):
        return ts if ts.tzinfo else ts.replace(tzinfo=UTC)
    return datetime.fromtimestamp(ts, UTC)
