"""Sensors that request minute rollups: new minutes as they close, repairs, and late data."""

import json
from datetime import UTC, datetime, timedelta

import dagster as dg
import polars as pl

from energy_pipeline.resources import InfluxDBResource, PostgresResource, RollupSettings
from energy_pipeline.scheduling import (
    MINUTE,
    contiguous_ranges,
    minutes_between,
    new_minutes,
    newest_due_minute,
    parse_partition_key,
    partition_key,
)
from energy_pipeline.storage import ledger_between, record_late_points_ignored

ORIGIN_TAG = "energy/origin"
ORIGINS = ("minutes", "repair", "late")
# Failed or lost minutes are requested again at most this often, so an outage does not turn into
# a storm of failing runs.
REPAIR_BACKOFF = timedelta(seconds=60)
IN_FLIGHT_HORIZON = timedelta(minutes=30)
QUEUED_OR_RUNNING = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def utcnow() -> datetime:
    return datetime.now(UTC)


def _run_request(
    asset_key: dg.AssetKey, first: datetime, last: datetime, run_key: str, origin: str
) -> dg.RunRequest:
    tags = {ORIGIN_TAG: origin}
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
    asset_key: dg.AssetKey, minutes, max_len: int, key_prefix: str, key_suffix: str = ""
) -> list[dg.RunRequest]:
    return [
        _run_request(
            asset_key,
            first,
            last,
            f"{key_prefix}:{partition_key(first)}:{partition_key(last)}{key_suffix}",
            key_prefix,
        )
        for first, last in contiguous_ranges(minutes, max_len)
    ]


def in_flight_minutes(instance: dg.DagsterInstance, now: datetime) -> set[datetime]:
    """Minutes covered by rollup runs that are queued or running.

    Queued and running runs always count (run monitoring fails running ones whose process died).
    A run still NOT_STARTED long after it was created was orphaned (a daemon died while submitting
    it) and must not block its minutes forever.
    """
    tags = {ORIGIN_TAG: list(ORIGINS)}
    runs = [
        *instance.get_runs(filters=dg.RunsFilter(statuses=QUEUED_OR_RUNNING, tags=tags)),
        *instance.get_runs(
            filters=dg.RunsFilter(
                statuses=[dg.DagsterRunStatus.NOT_STARTED],
                tags=tags,
                created_after=now - IN_FLIGHT_HORIZON,
            )
        ),
    ]
    out: set[datetime] = set()
    for run in runs:
        run_tags = run.tags
        first = run_tags.get("dagster/asset_partition_range_start") or run_tags.get(
            "dagster/partition"
        )
        last = run_tags.get("dagster/asset_partition_range_end") or run_tags.get(
            "dagster/partition"
        )
        if first and last:
            out.update(minutes_between(parse_partition_key(first), parse_partition_key(last)))
    return out


def build_minute_rollup_sensor(
    asset: dg.AssetsDefinition, partitions_def: dg.TimeWindowPartitionsDefinition
) -> dg.SensorDefinition:
    """Requests each closed minute once (ranged runs after downtime) and repairs failed ones."""
    earliest = partitions_def.start.astimezone(UTC)

    @dg.sensor(
        name="minute_rollup_sensor",
        target=[asset],
        minimum_interval_seconds=2,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def minute_rollup_sensor(
        context: dg.SensorEvaluationContext,
        postgres: PostgresResource,
        rollup_settings: RollupSettings,
    ) -> dg.SensorResult | dg.SkipReason:
        """Rolls up each minute once it has closed and settled; re-requests minutes that failed."""
        now = utcnow()
        cursor = json.loads(context.cursor) if context.cursor else {}
        last = parse_partition_key(cursor["last"]) if cursor.get("last") else None
        # Repairs never reach before the first minute this sensor requested: older history is a
        # backfill decision, not a repair.
        since = parse_partition_key(cursor["since"]) if cursor.get("since") else None
        newest = newest_due_minute(now, rollup_settings.settle_seconds)
        if newest < earliest:
            return dg.SkipReason("no closed minute inside the partition range yet")
        max_len = rollup_settings.max_range_minutes
        fresh = new_minutes(last, newest, earliest)
        requests = _requests(asset.key, fresh, max_len, "minutes")

        repair_after = cursor.get("repair_after", 0.0)
        if last is not None and now.timestamp() >= repair_after:
            lookback = max(
                earliest,
                since or earliest,
                newest - timedelta(seconds=rollup_settings.lateness_seconds),
            )
            with postgres.connect() as conn:
                done = set(ledger_between(conn, lookback, last + MINUTE)["bucket"].to_list())
            covered = done | in_flight_minutes(context.instance, now)
            missing = [m for m in minutes_between(lookback, last) if m not in covered]
            if missing:
                context.log.warning(f"re-requesting {len(missing)} minutes without rollups")
                requests += _requests(
                    asset.key, missing, max_len, "repair", f":{int(now.timestamp())}"
                )
                repair_after = (now + REPAIR_BACKOFF).timestamp()

        new_cursor = {
            "last": partition_key(newest),
            "since": partition_key(since or (fresh[0] if fresh else newest)),
            "repair_after": repair_after,
        }
        if not requests:
            return dg.SensorResult(skip_reason="nothing due", cursor=json.dumps(new_cursor))
        return dg.SensorResult(run_requests=requests, cursor=json.dumps(new_cursor))

    return minute_rollup_sensor


def late_minutes(influx_counts: pl.DataFrame, ledger: pl.DataFrame) -> pl.DataFrame:
    """Minutes whose point counts in InfluxDB differ from what their rollup read.

    Returns bucket, the extra points (InfluxDB minus ledger, at least 1) per minute.
    """
    counts = influx_counts.with_columns(
        pl.from_epoch("minute", "ns")
        .dt.replace_time_zone("UTC")
        .cast(pl.Datetime("us", "UTC"))
        .alias("bucket")
    )
    joined = ledger.join(counts, on="bucket", how="left", suffix="_influx").with_columns(
        pl.col("power_w_points_influx").fill_null(0),
        pl.col("energy_wh_points_influx").fill_null(0),
    )
    diff = pl.max_horizontal(
        (pl.col("power_w_points_influx") - pl.col("power_w_points")).abs(),
        (pl.col("energy_wh_points_influx") - pl.col("energy_wh_points")).abs(),
    )
    return (
        joined.with_columns(diff.alias("extra_points"))
        .filter(pl.col("extra_points") > 0)
        .select("bucket", "extra_points", "late_points_ignored")
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
        rollup_settings: RollupSettings,
    ) -> dg.SensorResult | dg.SkipReason:
        """Compares per-minute point counts in InfluxDB with what each rollup read.

        Counting costs InfluxDB about 0.08 s per minute of 5,000 devices, so each tick checks the
        recent minutes (where late points mostly land) and the whole lateness window plus the audit
        margin only every `late_full_scan_seconds`.
        """
        now = utcnow()
        cursor = json.loads(context.cursor) if context.cursor else {}
        full_scan = now.timestamp() - cursor.get("full_scan_at", 0.0) >= (
            rollup_settings.late_full_scan_seconds
        )
        reach = (
            rollup_settings.lateness_seconds + rollup_settings.late_audit_extra_seconds
            if full_scan
            else min(rollup_settings.late_recent_seconds, rollup_settings.lateness_seconds)
        )
        horizon = max(earliest, now - timedelta(seconds=reach)).replace(second=0, microsecond=0)
        window_end = newest_due_minute(now, rollup_settings.settle_seconds) + MINUTE
        new_cursor = json.dumps(
            {"full_scan_at": now.timestamp() if full_scan else cursor.get("full_scan_at", 0.0)}
        )
        if window_end <= horizon:
            return dg.SensorResult(skip_reason="nothing rolled up yet", cursor=new_cursor)
        counts = influxdb.client().minute_counts(influxdb.measurement, horizon, window_end)
        with postgres.connect() as conn:
            late = late_minutes(counts, ledger_between(conn, horizon, window_end))
            cutoff = now - timedelta(seconds=rollup_settings.lateness_seconds)
            too_late = late.filter(
                (pl.col("bucket") < cutoff)
                & (pl.col("extra_points") != pl.col("late_points_ignored"))
            )
            if too_late.height:
                record_late_points_ignored(conn, too_late.select("bucket", "extra_points").rows())
                context.log.warning(
                    f"{int(too_late['extra_points'].sum())} points arrived for "
                    f"{too_late.height} minutes older than the lateness window; not recomputed, "
                    "recorded in energy.rollup_minutes.late_points_ignored"
                )
        busy = in_flight_minutes(context.instance, now)
        due = [
            m for m in late.filter(pl.col("bucket") >= cutoff)["bucket"].to_list() if m not in busy
        ]
        scope = "full lateness window" if full_scan else "recent minutes"
        if not due:
            return dg.SensorResult(
                skip_reason=f"no late points ({scope} checked)", cursor=new_cursor
            )
        context.log.info(f"recomputing {len(due)} minutes that received late points ({scope})")
        return dg.SensorResult(
            run_requests=_requests(
                asset.key,
                due,
                rollup_settings.max_range_minutes,
                "late",
                f":{int(now.timestamp())}",
            ),
            cursor=new_cursor,
        )

    return late_data_sensor
