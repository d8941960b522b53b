"""The sensor that rolls minute rows up into the hierarchy as soon as their windows are ready."""

from datetime import UTC, datetime, timedelta

import dagster as dg

from energy_pipeline.defs.hierarchy.assets import device_rollup_1h, household_rollup_5m
from energy_pipeline.defs.hierarchy.partitions import (
    FIVE_MINUTE_PARTITIONS,
    HIERARCHY_START,
    HOURLY_PARTITIONS,
)
from energy_pipeline.defs.runs import FAILED, IN_FLIGHT, ORIGIN_TAG, run_time, utcnow
from energy_pipeline.hierarchy import (
    DEVICE_1H,
    GRAIN_LENGTH,
    HOUSEHOLD_5M,
    WindowPlanSettings,
    WindowRequest,
    WindowRun,
    pending_windows,
    plan_windows,
)
from energy_pipeline.resources import PostgresResource
from energy_pipeline.scheduling import PARTITION_FMT

GRAIN_TAG = "energy/grain"
ORIGIN = "hierarchy"
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
MAX_RUNTIME_TAG = "dagster/max_runtime"
ASSETS = {HOUSEHOLD_5M: household_rollup_5m, DEVICE_1H: device_rollup_1h}
# One job per grain: a sensor's target must share one partitions definition. A job selecting an
# asset runs its checks in the same run; steps run in the run's own process.
JOBS = {
    grain: dg.define_asset_job(
        f"{grain}_job",
        selection=dg.AssetSelection.assets(ASSETS[grain]),
        partitions_def=partitions_def,
        executor_def=dg.in_process_executor,
    )
    for grain, partitions_def in (
        (HOUSEHOLD_5M, FIVE_MINUTE_PARTITIONS),
        (DEVICE_1H, HOURLY_PARTITIONS),
    )
}
# Catch-up runs span at most this many windows: 6 hours of 5-minute windows, a day of hours
# (about 3 s and 5 s at 5,000 devices, see docs/design.md).
MAX_WINDOWS_PER_RUN = {HOUSEHOLD_5M: 72, DEVICE_1H: 24}


def _parse(key: str) -> datetime:
    return datetime.strptime(key, PARTITION_FMT).replace(tzinfo=UTC)


def hierarchy_runs(
    instance: dg.DagsterInstance, grain: str, statuses: list, created_after: datetime
) -> list[WindowRun]:
    """The sensor's runs of `grain` in `statuses`, created after `created_after`, as windows."""
    out = []
    records = instance.get_run_records(
        filters=dg.RunsFilter(
            statuses=statuses, tags={GRAIN_TAG: grain}, created_after=created_after
        )
    )
    for record in records:
        tags = record.dagster_run.tags
        first = tags.get(RANGE_START_TAG) or tags.get("dagster/partition")
        last = tags.get(RANGE_END_TAG) or tags.get("dagster/partition")
        created = run_time(record.create_timestamp)
        if not (first and last and created):
            continue
        out.append(WindowRun(_parse(first), _parse(last), created, run_time(record.end_time)))
    return out


def run_request(grain: str, request: WindowRequest, run_timeout_seconds: int) -> dg.RunRequest:
    """A run of `grain` over the request's windows: one partition, or a range in one run."""
    tags = {
        ORIGIN_TAG: ORIGIN,
        GRAIN_TAG: grain,
        MAX_RUNTIME_TAG: str(run_timeout_seconds),
    }
    first, last = request.first.strftime(PARTITION_FMT), request.last.strftime(PARTITION_FMT)
    if first == last:
        return dg.RunRequest(
            run_key=request.run_key,
            partition_key=first,
            job_name=JOBS[grain].name,
            tags=tags,
        )
    return dg.RunRequest(
        run_key=request.run_key,
        job_name=JOBS[grain].name,
        tags={**tags, RANGE_START_TAG: first, RANGE_END_TAG: last},
    )


def build_hierarchy_sensor(
    lateness_seconds: int = 7200,
    catch_up_days: int = 30,
    run_timeout_seconds: int = 900,
    minimum_interval_seconds: int = 1,
) -> dg.SensorDefinition:
    """The sensor requesting each 5-minute and hourly window once its minutes are ready.

    Args:
        lateness_seconds: how long a window waits for minutes that never arrive.
        catch_up_days: how far back windows are looked for (after an outage).
        run_timeout_seconds: a run in flight longer than this is treated as lost.
    """

    @dg.sensor(
        name="hierarchy_sensor",
        jobs=list(JOBS.values()),
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def hierarchy_sensor(
        context: dg.SensorEvaluationContext, postgres: PostgresResource
    ) -> dg.SensorResult:
        """Rolls up each window whose minutes are all in the ledger (or whose lateness window
        has passed), and again whenever one of its minutes is recomputed."""
        now = utcnow()
        requests: list[dg.RunRequest] = []
        with postgres.connect() as conn:
            for grain, step in GRAIN_LENGTH.items():
                since = max(HIERARCHY_START, now - timedelta(days=catch_up_days))
                since = since.replace(minute=0, second=0, microsecond=0)
                until = datetime.fromtimestamp(
                    now.timestamp() // step.total_seconds() * step.total_seconds(), UTC
                )
                if until <= since:
                    continue
                pending = pending_windows(conn, grain, since, until)
                if not pending:
                    continue
                in_flight = [
                    r
                    for r in hierarchy_runs(
                        context.instance,
                        grain,
                        IN_FLIGHT,
                        now - timedelta(seconds=run_timeout_seconds),
                    )
                ]
                failed = hierarchy_runs(context.instance, grain, FAILED, now - timedelta(days=1))
                settings = WindowPlanSettings(
                    lateness=timedelta(seconds=lateness_seconds),
                    max_windows_per_run=MAX_WINDOWS_PER_RUN[grain],
                )
                plan = plan_windows(grain, pending, in_flight, failed, now, settings)
                requests += [run_request(grain, r, run_timeout_seconds) for r in plan]
        return dg.SensorResult(
            run_requests=requests, skip_reason=None if requests else "no window ready"
        )

    return hierarchy_sensor
