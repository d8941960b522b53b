"""Retention in Dagster: the `retention` asset's metadata, and purging Dagster's own runs without
changing the status of partitions that still exist."""

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.reconstruct import ReconstructableRepository
from dagster._core.storage.partition_status_cache import AssetPartitionStatus
from dagster._utils.schedules import cron_string_iterator

from energy_pipeline.config import Settings, dagster_storage_url
from energy_pipeline.defs.retention import build_defs
from energy_pipeline.defs.retention.assets import RetentionSettings
from energy_pipeline.defs.retention.assets import retention as retention_asset
from energy_pipeline.defs.retention.runs import old_finished_runs, purge_runs
from energy_pipeline.resources import PostgresResource
from energy_pipeline.retention import vacuum_days
from energy_pipeline.scheduling import partitions_start
from energy_pipeline.storage import connect, create_partitions

DAY0 = datetime(2026, 10, 1, tzinfo=UTC)
FAILING = "2026-10-07"


@pytest.fixture
def instance(dagster_db: str) -> Iterator[dg.DagsterInstance]:
    """A Dagster instance whose storage is a fresh PostgreSQL database, as in production."""
    overrides = {"storage": {"postgres": {"postgres_url": dagster_storage_url(dagster_db)}}}
    with dg.instance_for_test(overrides=overrides) as inst:
        yield inst


def _daily(start: datetime) -> dg.DailyPartitionsDefinition:
    return dg.DailyPartitionsDefinition(start_date=start, timezone="UTC")


@dg.asset(partitions_def=_daily(DAY0))
def sample(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    if context.partition_key == FAILING:
        raise RuntimeError("this partition's runs fail")
    return dg.MaterializeResult(metadata={"partition": context.partition_key})


def _key(day: int) -> str:
    return (DAY0 + timedelta(days=day)).strftime("%Y-%m-%d")


def _materialize(instance: dg.DagsterInstance, day: int) -> str:
    result = dg.materialize(
        [sample], instance=instance, partition_key=_key(day), raise_on_error=False
    )
    assert result.success == (_key(day) != FAILING)
    return result.run_id


def _status(instance: dg.DagsterInstance, pdef: dg.PartitionsDefinition, keys) -> dict:
    return dict(instance.get_status_by_partition(sample.key, list(keys), pdef) or {})


def _materialized(instance: dg.DagsterInstance, pdef: dg.PartitionsDefinition, keys) -> set[str]:
    status = _status(instance, pdef, keys)
    return {k for k, v in status.items() if v == AssetPartitionStatus.MATERIALIZED}


def test_purge_keeps_the_runs_partition_status_rests_on(instance):
    runs = {day: [_materialize(instance, day)] for day in range(6)}
    runs[1].append(_materialize(instance, 1))  # re-materialized: the older run can go
    runs[4].append(_materialize(instance, 4))
    runs[6] = [_materialize(instance, 6)]  # fails: the partition shows as failed
    # The window moved: partitions start at day 3 now (days 0..2 left it, like old minutes).
    now = DAY0 + timedelta(days=7)
    window = _daily(DAY0 + timedelta(days=3))
    surviving = {_key(d) for d in (3, 4, 5)}
    with dg.partition_loading_context(effective_dt=now, dynamic_partitions_store=instance):
        assert _materialized(instance, window, surviving) == surviving
        status = _status(instance, window, window.get_partition_keys())
        assert status[FAILING] == AssetPartitionStatus.FAILED

        dry = purge_runs(
            instance,
            {sample.key: window},
            datetime.now(UTC) + timedelta(seconds=1),
            now,
            dry_run=True,
        )
        assert (dry.runs_deleted, dry.runs_kept) == (5, 4)
        assert len(old_finished_runs(instance, datetime.now(UTC) + timedelta(seconds=1))) == 9

        purge = purge_runs(
            instance, {sample.key: window}, datetime.now(UTC) + timedelta(seconds=1), now
        )
        assert (purge.runs_deleted, purge.runs_kept) == (5, 4)
        assert purge.kept_run_ids == {runs[3][-1], runs[4][-1], runs[5][-1], runs[6][0]}
        left = {r.dagster_run.run_id for r in instance.get_run_records()}
        assert left == purge.kept_run_ids
        # Their event logs went with them.
        assert not instance.all_logs(runs[0][0]) and not instance.all_logs(runs[4][0])

        # Status is unchanged, also when rebuilt from the event log (as after a partitions change).
        assert _status(instance, window, window.get_partition_keys()) == status
        instance.event_log_storage.wipe_asset_cached_status(sample.key)
        assert _status(instance, window, window.get_partition_keys()) == status
        latest = instance.get_latest_materialization_event(sample.key)
        assert latest is not None and latest.run_id == runs[4][-1]  # the newest run of all

        # A second purge finds nothing more to delete.
        again = purge_runs(
            instance, {sample.key: window}, datetime.now(UTC) + timedelta(seconds=1), now
        )
        assert (again.runs_deleted, again.runs_kept) == (0, 4)

        # The mechanism the purge protects against is real: deleting a kept run loses its
        # partition's status once the cache is rebuilt.
        instance.delete_run(runs[4][-1])
        instance.event_log_storage.wipe_asset_cached_status(sample.key)
        assert _materialized(instance, window, surviving) == surviving - {_key(4)}


def test_purge_leaves_runs_newer_than_the_cutoff(instance):
    old = _materialize(instance, 0)
    cut = datetime.now(UTC)
    new = _materialize(instance, 0)
    purge = purge_runs(instance, {sample.key: _daily(DAY0)}, cut, DAY0 + timedelta(days=2))
    assert purge.runs_deleted == 1
    assert {r.dagster_run.run_id for r in instance.get_run_records()} == {new}
    assert instance.get_run_by_id(old) is None


def test_a_long_backlog_is_purged_over_several_runs(instance):
    for _ in range(3):
        _materialize(instance, 0)
    cut, now, assets = datetime.now(UTC), DAY0 + timedelta(days=2), {sample.key: _daily(DAY0)}
    first = purge_runs(instance, assets, cut, now, max_deletes=1)
    assert (first.runs_deleted, first.runs_kept, first.runs_left) == (1, 1, 1)
    assert "1 left for the next purge" in first.summary()
    second = purge_runs(instance, assets, cut, now, max_deletes=1)
    assert (second.runs_deleted, second.runs_kept, second.runs_left) == (1, 1, 0)
    assert len(instance.get_run_records()) == 1


# The retention job as a code location runs it: from a repository (the asset asks it which
# partitions exist), with `sample` beside it. The asset reads the real clock, so the tests date
# their data from one reading of it, taken once: every day below is far from the horizons'
# edges, so a run crossing 00:00 UTC sees the same partitions removed and kept.
TODAY = datetime.now(UTC).date()
OLD_DAY = TODAY - timedelta(days=40)  # past the 35-day minute horizon, also a day later
# The middle one of the finished days a run vacuums: still among them if they move by a day.
FINISHED_DAY = vacuum_days(
    datetime.now(UTC), timedelta(seconds=Settings.from_env({}).lateness_seconds)
)[1]
RECENT = dg.DailyPartitionsDefinition(
    start_date=(TODAY - timedelta(days=60)).strftime("%Y-%m-%d"), timezone="UTC"
)


@dg.asset(partitions_def=RECENT, name="recent_sample")
def recent_sample() -> None:
    """A daily asset whose partitions all still exist."""


defs = dg.Definitions.merge(
    build_defs(Settings.from_env({})),
    dg.Definitions(
        assets=[recent_sample],
        resources={"postgres": PostgresResource(dsn=dg.EnvVar("RETENTION_TEST_PG_DSN"))},
        executor=dg.in_process_executor,
    ),
)


def _backdate_runs(dagster_dsn: str, days: int) -> None:
    """Make every run so far look `days` older, as if created then (the simulated clock)."""
    with connect(dagster_dsn) as conn:
        conn.execute(
            "UPDATE runs SET create_timestamp = create_timestamp - make_interval(days => %s)",
            (days,),
        )


def _old_partition(pg_dsn: str) -> str:
    """A minute rollup day partition past its horizon, holding one row; returns its name."""
    with connect(pg_dsn) as conn:
        create_partitions(conn, "device_rollup_1m", OLD_DAY, OLD_DAY)
        conn.execute(
            "INSERT INTO energy.device_rollup_1m (device_id, bucket, household_id, sample_count, "
            "energy_wh_sum, computed_at) VALUES ('d1', %s, 'h1', 60, 1, now())",
            (datetime.combine(OLD_DAY, datetime.min.time(), UTC),),
        )
    return f"energy.device_rollup_1m_p{OLD_DAY:%Y%m%d}"


def _finished_partition(pg_dsn: str) -> str:
    """A finished minute rollup day partition with rows no vacuum has seen; returns its name."""
    with connect(pg_dsn) as conn:
        create_partitions(conn, "device_rollup_1m", FINISHED_DAY, FINISHED_DAY)
        # Committed before VACUUM runs, so that it can mark the rows visible to all.
        conn.execute("SET synchronous_commit = on")
        conn.execute(
            "INSERT INTO energy.device_rollup_1m (device_id, bucket, household_id, sample_count, "
            "energy_wh_sum, computed_at) SELECT 'd' || i, %s, 'h1', 60, 1, now() "
            "FROM generate_series(1, 30) i",
            (datetime.combine(FINISHED_DAY, datetime.min.time(), UTC),),
        )
        conn.execute("SELECT pg_stat_force_next_flush()")
    return f"device_rollup_1m_p{FINISHED_DAY:%Y%m%d}"


def _rows_in(pg_dsn: str, table: str) -> int | None:
    """Rows in `table`, None when it does not exist."""
    with connect(pg_dsn) as conn:
        row = conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()
        if row is None or row[0] is None:
            return None
        count = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    return int(count[0]) if count else 0


def test_retention_job_reports_what_it_removed_and_purges_old_runs(
    instance, settings, dagster_db, monkeypatch
):
    old_day, old_table = OLD_DAY, _old_partition(settings.pg_dsn)
    finished = _finished_partition(settings.pg_dsn)
    key = (TODAY - timedelta(days=50)).strftime("%Y-%m-%d")
    first = dg.materialize([recent_sample], instance=instance, partition_key=key).run_id
    second = dg.materialize([recent_sample], instance=instance, partition_key=key).run_id
    _backdate_runs(dagster_db, 40)
    monkeypatch.setenv("RETENTION_TEST_PG_DSN", settings.pg_dsn)

    job = ReconstructableRepository.for_module(
        __name__, "defs", working_directory=str(Path(__file__).parent.parent)
    ).get_reconstructable_job("retention_job")
    with dg.execute_job(job, instance=instance) as result:
        assert result.success
        [mat] = result.asset_materializations_for_node("retention")
    meta = mat.metadata
    assert meta["partitions_dropped"].value == 1
    assert meta["rows_removed"].value == 1
    assert meta["bytes_freed"].value > 0
    tables = meta["tables"].value
    assert tables["device_rollup_1m"]["partitions_dropped"] == [old_day.isoformat()]
    assert "| device_rollup_1m |" in meta["summary"].value
    # The finished day's rows were vacuumed: every page of it is all-visible now.
    assert (meta["partitions_vacuumed"].value, meta["vacuum_warnings"].value) == (1, 0)
    assert tables["device_rollup_1m"]["partitions_vacuumed"] == [finished]
    [vacuum] = meta["vacuums"].value
    assert (vacuum["partition"], vacuum["rows_since_vacuum"], vacuum["error"]) == (finished, 30, "")
    visible, pages = vacuum["all_visible_pages_after"]
    assert visible == pages > 0
    assert f"- {finished}: 30 rows inserted" in meta["summary"].value
    # The older run of the partition went; the one its status rests on stayed.
    assert (meta["dagster_runs_deleted"].value, meta["dagster_runs_kept"].value) == (1, 1)
    assert instance.get_run_by_id(first) is None
    assert instance.get_run_by_id(second) is not None
    assert _rows_in(settings.pg_dsn, old_table) is None


def test_retention_schedule_runs_daily_after_the_minute_window_moves():
    from energy_pipeline.definitions import build_definitions

    settings = Settings.from_env({})
    repo = build_definitions(settings).get_repository_def()
    schedule = repo.get_schedule_def("retention_schedule")
    assert schedule.job_name == "retention_job"
    assert repo.get_job("retention_job") is not None

    before_midnight = datetime(2026, 11, 27, 23, 59, 30, tzinfo=UTC)
    midnight = datetime(2026, 11, 28, tzinfo=UTC)
    ticks = cron_string_iterator(
        before_midnight.timestamp(), schedule.cron_schedule, schedule.execution_timezone
    )
    first, second = next(ticks), next(ticks)
    # Once a day, the same UTC day as the rollover it follows.
    assert second - first == timedelta(days=1)
    assert first.astimezone(UTC).date() == midnight.date()
    # It sees the minute window that moved at that midnight, not the previous day's ...
    start = partitions_start(first, settings.raw_retention_days)
    assert start == partitions_start(midnight, settings.raw_retention_days)
    assert start > partitions_start(before_midnight, settings.raw_retention_days)
    # ... and runs when the previous UTC day has left the lateness window (no recompute left).
    assert first - midnight > timedelta(seconds=settings.lateness_seconds)


def _bare_materialize(instance, settings, **overrides) -> dg.ExecuteInProcessResult:
    """The retention asset in a bare in-process job (no code location), with its resources."""
    resources = dict(build_defs(settings).resources or {})
    if overrides:
        resources["retention_settings"] = RetentionSettings(
            **{**resources["retention_settings"].model_dump(), **overrides}
        )
    return dg.materialize(
        [retention_asset],
        instance=instance,
        resources={**resources, "postgres": PostgresResource(dsn=settings.pg_dsn)},
        raise_on_error=False,
    )


def _failure_message(result: dg.ExecuteInProcessResult) -> str:
    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    return str(failure.event_specific_data)


def test_retention_outside_a_code_location_refuses_to_purge_blind(instance, settings):
    old_table = _old_partition(settings.pg_dsn)
    result = _bare_materialize(instance, settings)
    assert "needs the code location's definitions" in _failure_message(result)
    # It refused before removing anything: the expired partition and its row are still there.
    assert _rows_in(settings.pg_dsn, old_table) == 1
    assert not result.asset_materializations_for_node("retention")


def test_retention_refuses_a_horizon_inside_the_minute_window_before_removing(instance, settings):
    old_table = _old_partition(settings.pg_dsn)
    result = _bare_materialize(instance, settings, retention_device_rollup_1m_days=7)
    message = _failure_message(result)
    assert "refuses its settings, nothing was removed" in message
    assert "ENERGY_RETENTION_DEVICE_ROLLUP_1M_DAYS (7 days) must be at least" in message
    assert _rows_in(settings.pg_dsn, old_table) == 1
