"""Sensors that request minute rollups: new minutes as they close, repairs, and late data."""

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import dagster as dg
import psycopg

from energy_pipeline.config import RUN_TIMEOUT_SECONDS
from energy_pipeline.defs.minute_rollups.settings import MinuteSensorSettings
from energy_pipeline.defs.runs import utcnow  # a module name tests can replace
from energy_pipeline.ledger import ledger_gaps_between
from energy_pipeline.planning import (
    Cursor,
    MinutePlan,
    PlanSettings,
    Range,
    RunInFlight,
    describe_ranges,
    is_orphan,
    plan_late_check,
    plan_minutes,
    repair_window,
    split_late,
)
from energy_pipeline.resources import InfluxDBResource, PostgresResource
from energy_pipeline.scheduling import (
    contiguous_ranges,
    minutes_between,
    newest_due_minute,
    parse_partition_key,
    partition_key,
)
from energy_pipeline.schemas import CHECKSUM_COLUMNS
from energy_pipeline.sources import COUNTED, RawSource, late_minutes
from energy_pipeline.storage import (
    ledger_between,
    minutes_of_registered_unknowns,
    record_late_points_ignored,
    record_out_of_range,
)

ORIGIN_TAG = "energy/origin"
# Points dated this far ahead of the clock are counted as out of range (a device clock far off);
# nearer ones are rolled up when their minute comes.
FUTURE_TOLERANCE = timedelta(hours=1)
ORIGINS = ("minutes", "repair", "late")
QUEUED_OR_RUNNING = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]
# Run monitoring fails a run that has been STARTED longer than this tag says, even when its
# process died with the daemon (the default run launcher cannot check worker health).
MAX_RUNTIME_TAG = "dagster/max_runtime"
# The queue starts higher numbers first: new minutes go before repairs of older ones.
PRIORITY_TAG = "dagster/priority"
REPAIR_PRIORITY = "-1"


def _run_request(
    asset_key: dg.AssetKey,
    first: datetime,
    last: datetime,
    run_key: str,
    origin: str,
    extra_tags: Mapping[str, str] | None = None,
) -> dg.RunRequest:
    tags = {ORIGIN_TAG: origin, **(extra_tags or {})}
    if first == last:
        return dg.RunRequest(
            run_key=run_key,
            partition_key=partition_key(first),
            asset_selection=[asset_key],
            tags=tags,
        )
    tags |= {
        "dagster/asset_partition_range_start": partition_key(first),
        "dagster/asset_partition_range_end": partition_key(last),
    }
    return dg.RunRequest(run_key=run_key, asset_selection=[asset_key], tags=tags)


def _requests(
    asset_key: dg.AssetKey,
    minutes,
    max_len: int,
    key_prefix: str,
    key_suffix: str = "",
    extra_tags: Mapping[str, str] | None = None,
) -> list[dg.RunRequest]:
    return _range_requests(
        asset_key, contiguous_ranges(minutes, max_len), key_prefix, key_suffix, extra_tags
    )


def _range_requests(
    asset_key: dg.AssetKey,
    ranges: list[Range],
    key_prefix: str,
    key_suffix: str = "",
    extra_tags: Mapping[str, str] | None = None,
) -> list[dg.RunRequest]:
    return [
        _run_request(
            asset_key,
            first,
            last,
            f"{key_prefix}:{partition_key(first)}:{partition_key(last)}{key_suffix}",
            key_prefix,
            extra_tags,
        )
        for first, last in ranges
    ]


def run_tags(minute_sensors: MinuteSensorSettings) -> dict[str, str]:
    """Tags every sensor-requested rollup run carries: its runtime limit for run monitoring."""
    return {MAX_RUNTIME_TAG: str(minute_sensors.run_timeout_seconds)}


def _aware(ts: datetime) -> datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def runs_in_flight(
    instance: dg.DagsterInstance, now: datetime, run_timeout_seconds: int
) -> list[RunInFlight]:
    """Rollup runs requested by the sensors that have not finished, orphans included."""
    tags = {ORIGIN_TAG: list(ORIGINS)}
    records = [
        *instance.get_run_records(filters=dg.RunsFilter(statuses=QUEUED_OR_RUNNING, tags=tags)),
        # Runs left NOT_STARTED by a daemon that died while submitting them stay so forever:
        # only recent ones can still be submitted.
        *instance.get_run_records(
            filters=dg.RunsFilter(
                statuses=[dg.DagsterRunStatus.NOT_STARTED],
                tags=tags,
                created_after=now - timedelta(seconds=run_timeout_seconds),
            )
        ),
    ]
    out = []
    for record in records:
        run = record.dagster_run
        first = run.tags.get("dagster/asset_partition_range_start") or run.tags.get(
            "dagster/partition"
        )
        last = run.tags.get("dagster/asset_partition_range_end") or run.tags.get(
            "dagster/partition"
        )
        if not (first and last):
            continue
        if run.status == dg.DagsterRunStatus.STARTED and record.start_time is not None:
            since = datetime.fromtimestamp(record.start_time, UTC)
        elif run.status in (dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING):
            since = _aware(record.update_timestamp)
        else:
            since = _aware(record.create_timestamp)
        out.append(
            RunInFlight(
                origin=run.tags.get(ORIGIN_TAG, ""),
                status=run.status.value,
                first=parse_partition_key(first),
                last=parse_partition_key(last),
                since=since,
            )
        )
    return out


def in_flight_minutes(
    instance: dg.DagsterInstance, now: datetime, run_timeout_seconds: int = RUN_TIMEOUT_SECONDS
) -> set[datetime]:
    """Minutes covered by rollup runs that are queued or running and not orphaned.

    A run created, starting or started more than `run_timeout_seconds` ago lost its process (a
    crash of the daemon's process tree leaves it STARTED until run monitoring fails it) and must
    not keep its minutes from being requested again.
    """
    return {
        m
        for run in runs_in_flight(instance, now, run_timeout_seconds)
        if not is_orphan(run, now, run_timeout_seconds)
        for m in minutes_between(run.first, run.last)
    }


def _cursor(raw: str | None) -> Cursor:
    data = json.loads(raw) if raw else {}
    return Cursor(
        last=parse_partition_key(data["last"]) if data.get("last") else None,
        since=parse_partition_key(data["since"]) if data.get("since") else None,
        repair_after=data.get("repair_after", 0.0),
        hole_minutes=data.get("hole_minutes", 0),
    )


def _cursor_json(cursor: Cursor) -> str:
    return json.dumps(
        {
            "last": partition_key(cursor.last) if cursor.last else None,
            "since": partition_key(cursor.since) if cursor.since else None,
            "repair_after": cursor.repair_after,
            "hole_minutes": cursor.hole_minutes,
        }
    )


def _report_holes(
    context: dg.SensorEvaluationContext, asset_key: dg.AssetKey, plan: MinutePlan, before: int
) -> list[dg.AssetObservation]:
    """Warn about minutes without rollups and record their count on the asset when it changes."""
    for run in plan.orphans:
        context.log.warning(
            f"a {run.origin} run of {partition_key(run.first)}..{partition_key(run.last)} has "
            f"been {run.status} since {run.since:%Y-%m-%d %H:%M:%S}Z: treated as orphaned"
        )
    if plan.holes is None:
        return []  # no scan on this tick: nothing new to say
    holes = plan.holes
    if holes:
        context.log.warning(
            f"{plan.hole_minutes} minutes have no rollup (no row in energy.rollup_minutes): "
            f"{describe_ranges(holes)}; repairing {len(plan.repairs)} ranges now, newest first, "
            f"{plan.deferred_minutes} minutes on later ticks"
        )
    if plan.hole_minutes == before:
        return []
    return [
        dg.AssetObservation(
            asset_key=asset_key,
            metadata={
                "minutes_without_rollup": plan.hole_minutes,
                "ranges_without_rollup": describe_ranges(holes, limit=50) or "none",
                "oldest_minute_without_rollup": (
                    partition_key(min(first for first, _ in holes)) if holes else "none"
                ),
            },
        )
    ]


def build_minute_rollup_sensor(
    asset: dg.AssetsDefinition, partitions_def: dg.TimeWindowPartitionsDefinition
) -> dg.SensorDefinition:
    """Requests each closed minute once (ranged runs after downtime) and repairs missing ones."""
    earliest = partitions_def.start.astimezone(UTC)

    @dg.sensor(
        name="minute_rollup_sensor",
        target=[asset],
        minimum_interval_seconds=1,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def minute_rollup_sensor(
        context: dg.SensorEvaluationContext,
        postgres: PostgresResource,
        minute_sensors: MinuteSensorSettings,
    ) -> dg.SensorResult | dg.SkipReason:
        """Rolls up each minute once it has closed and settled; repairs minutes without rollups.

        Repairs reach back to the first minute this sensor requested (older history is a
        backfill) or the start of raw-data retention, whichever is later; see `planning`.
        """
        now = utcnow()
        cursor = _cursor(context.cursor)
        if newest_due_minute(now, minute_sensors.settle_seconds) < earliest:
            return dg.SkipReason("no closed minute inside the partition range yet")
        settings = PlanSettings(
            earliest=earliest,
            settle_seconds=minute_sensors.settle_seconds,
            max_range_minutes=minute_sensors.max_range_minutes,
            raw_retention_days=minute_sensors.raw_retention_days,
            run_timeout_seconds=minute_sensors.run_timeout_seconds,
        )
        window = repair_window(cursor, now, settings)
        holes: list[Range] | None = None
        in_flight: list[RunInFlight] = []
        if window is not None:
            with postgres.connect() as conn:
                holes = ledger_gaps_between(conn, *window)
            in_flight = runs_in_flight(context.instance, now, settings.run_timeout_seconds)
        plan = plan_minutes(cursor, holes, in_flight, now, settings)
        events = _report_holes(context, asset.key, plan, cursor.hole_minutes)
        tags = run_tags(minute_sensors)
        requests = [
            *_range_requests(asset.key, plan.fresh, "minutes", extra_tags=tags),
            *_range_requests(
                asset.key,
                plan.repairs,
                "repair",
                f":{int(now.timestamp())}",
                {**tags, PRIORITY_TAG: REPAIR_PRIORITY},
            ),
        ]
        return dg.SensorResult(
            run_requests=requests,
            asset_events=events,
            cursor=_cursor_json(plan.cursor),
            skip_reason=None if requests else "nothing due",
        )

    return minute_rollup_sensor


def _audit_out_of_range(
    context: dg.SensorEvaluationContext,
    source: RawSource,
    conn: psycopg.Connection,
    earliest: datetime,
    now: datetime,
) -> None:
    bounds = {"before": earliest, "after": now + FUTURE_TOLERANCE}
    counts = source.out_of_range(bounds["before"], bounds["after"])
    record_out_of_range(conn, counts, bounds, now)
    if any(counts.values()):
        context.log.warning(
            f"InfluxDB holds {counts['before']} field values older than the first minute "
            f"partition ({earliest:%Y-%m-%d %H:%M}) and {counts['after']} dated after "
            f"{bounds['after']:%Y-%m-%d %H:%M}: no rollup will ever read them "
            "(see energy.raw_out_of_range)"
        )


def build_late_data_sensor(
    asset: dg.AssetsDefinition, partitions_def: dg.TimeWindowPartitionsDefinition
) -> dg.SensorDefinition:
    """Recomputes minutes that received points after their rollup, within the lateness window."""
    earliest = partitions_def.start.astimezone(UTC)

    @dg.sensor(
        name="late_data_sensor",
        target=[asset],
        minimum_interval_seconds=60,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def late_data_sensor(
        context: dg.SensorEvaluationContext,
        influxdb: InfluxDBResource,
        postgres: PostgresResource,
        minute_sensors: MinuteSensorSettings,
    ) -> dg.SensorResult | dg.SkipReason:
        """Compares per-minute checksums in InfluxDB with those each rollup was built from.

        Each tick checks the recent minutes (where late points mostly land); the whole lateness
        window plus the audit margin only every `late_full_scan_seconds` (see `planning`). The
        full scan also counts raw points outside every minute partition (a device clock far off)
        into `energy.raw_out_of_range`.
        """
        now = utcnow()
        cursor = json.loads(context.cursor) if context.cursor else {}
        s = minute_sensors
        check = plan_late_check(
            cursor.get("full_scan_at", 0.0),
            now,
            earliest,
            s.settle_seconds,
            s.lateness_seconds,
            s.late_audit_extra_seconds,
            s.late_recent_seconds,
            s.late_full_scan_seconds,
        )
        if check is None:
            return dg.SensorResult(skip_reason="nothing rolled up yet", cursor=context.cursor)
        new_cursor = json.dumps({"full_scan_at": check.full_scan_at})
        source = influxdb.source()
        # Recent ticks count points (late points, at the old check's cost); full scans compare
        # checksums, which also see values re-written with a correction (three times the cost).
        if check.full_scan:
            current, compared = source.checksums(check.start, check.end), CHECKSUM_COLUMNS
        else:
            current, compared = source.counts(check.start, check.end), COUNTED
        with postgres.connect() as conn:
            late = late_minutes(current, ledger_between(conn, check.start, check.end), compared)
            if check.full_scan:
                _audit_out_of_range(context, source, conn, earliest, now)
            busy = in_flight_minutes(context.instance, now, s.run_timeout_seconds)
            due, ignored = split_late(late.rows(), now, s.lateness_seconds, busy)
            # A device registered after its points were quarantined as unknown: within the
            # lateness window its minutes are rolled up again, as if the points came late.
            since = max(earliest, now - timedelta(seconds=s.lateness_seconds))
            registered = set(minutes_of_registered_unknowns(conn, since, check.end))
            registered -= busy | set(due)
            if registered:
                context.log.info(
                    f"rolling up {len(registered)} minutes again: they hold quarantined points "
                    "of devices registered since"
                )
                due = sorted({*due, *registered})
            if ignored:
                record_late_points_ignored(conn, ignored)
                context.log.warning(
                    f"{sum(n for _, n in ignored)} points arrived for {len(ignored)} minutes "
                    "older than the lateness window; not recomputed, recorded in "
                    "energy.rollup_minutes.late_points_ignored"
                )
        scope = "full lateness window" if check.full_scan else "recent minutes"
        if not due:
            return dg.SensorResult(
                skip_reason=f"no late points ({scope} checked)", cursor=new_cursor
            )
        context.log.info(f"recomputing {len(due)} minutes that received late points ({scope})")
        return dg.SensorResult(
            run_requests=_requests(
                asset.key,
                due,
                s.max_range_minutes,
                "late",
                f":{int(now.timestamp())}",
                extra_tags=run_tags(s),
            ),
            cursor=new_cursor,
        )

    return late_data_sensor
