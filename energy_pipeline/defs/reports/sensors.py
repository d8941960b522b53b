"""The sensor requesting each report day once every zone's day has closed, and again when a
5-minute window it read is recomputed (late data)."""

from datetime import date, datetime, timedelta

import dagster as dg

from energy_pipeline.defs.reports.assets import household_daily_report
from energy_pipeline.defs.reports.partitions import DAILY_REPORT_PARTITIONS, PARTITION_FMT
from energy_pipeline.defs.runs import FAILED, IN_FLIGHT, ORIGIN_TAG, run_time, utcnow
from energy_pipeline.reports.planning import DayRun, plan_report_days, report_day_states
from energy_pipeline.resources import PostgresResource

ORIGIN = "reports"
PARTITION_TAG = "dagster/partition"
REPORT_JOB = dg.define_asset_job(
    "household_daily_report_job",
    selection=dg.AssetSelection.assets(household_daily_report),
    partitions_def=DAILY_REPORT_PARTITIONS,
    executor_def=dg.in_process_executor,
)


def report_runs(instance: dg.DagsterInstance, statuses: list, since: datetime) -> list[DayRun]:
    """The sensor's report runs in `statuses` created after `since`, by day."""
    records = instance.get_run_records(
        filters=dg.RunsFilter(statuses=statuses, tags={ORIGIN_TAG: ORIGIN}, created_after=since)
    )
    out = []
    for record in records:
        key = record.dagster_run.tags.get(PARTITION_TAG)
        created = run_time(record.create_timestamp)
        if key and created:
            day = datetime.strptime(key, PARTITION_FMT).date()
            ended = run_time(record.end_time)
            out.append(DayRun(day, created, ended))
    return out


def build_report_sensor(
    settle_seconds: int = 1800,
    catch_up_days: int = 14,
    run_timeout_seconds: int = 900,
    minimum_interval_seconds: int = 60,
) -> dg.SensorDefinition:
    """The sensor of the daily reports.

    Args:
        settle_seconds: wait after the last zone's day has closed (late windows settle).
        catch_up_days: how far back stale or missing days are looked for.
    """

    @dg.sensor(
        name="household_daily_report_sensor",
        job=REPORT_JOB,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def household_daily_report_sensor(
        context: dg.SensorEvaluationContext, postgres: PostgresResource
    ) -> dg.SensorResult:
        """Requests each due report day that is missing or whose 5-minute windows changed."""
        now = utcnow()
        first_partition = datetime.strptime(
            DAILY_REPORT_PARTITIONS.get_first_partition_key() or "", PARTITION_FMT
        ).date()
        first = max(first_partition, now.date() - timedelta(days=catch_up_days))
        last: date = now.date() - timedelta(days=1)
        if last < first:
            return dg.SensorResult(skip_reason="no report day has closed yet")
        with postgres.connect() as conn:
            states = report_day_states(conn, first, last)
        plan = plan_report_days(
            states,
            report_runs(context.instance, IN_FLIGHT, now - timedelta(seconds=run_timeout_seconds)),
            report_runs(context.instance, FAILED, now - timedelta(days=1)),
            now,
            timedelta(seconds=settle_seconds),
        )
        requests = [
            dg.RunRequest(
                run_key=r.run_key,
                partition_key=r.day.strftime(PARTITION_FMT),
                tags={ORIGIN_TAG: ORIGIN, "dagster/max_runtime": str(run_timeout_seconds)},
            )
            for r in plan
        ]
        return dg.SensorResult(
            run_requests=requests, skip_reason=None if requests else "no report day due"
        )

    return household_daily_report_sensor
