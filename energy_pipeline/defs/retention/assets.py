"""The `retention` asset: removes what is past its horizon and says what it removed."""

from datetime import UTC, datetime, timedelta

import dagster as dg
from dagster_shared.check import CheckError

from energy_pipeline.config import ConfigError
from energy_pipeline.defs.retention.runs import RunPurge, asset_partitions, purge_runs
from energy_pipeline.resources import PostgresResource
from energy_pipeline.retention import (
    LOCK_TIMEOUT_MS,
    RetentionReport,
    horizons,
    run_retention,
    validate_horizons,
)
from energy_pipeline.scheduling import partitions_start


class RetentionSettings(dg.ConfigurableResource):
    """Horizons in days per table (0: kept forever), and the windows they may never reach into."""

    retention_device_rollup_1m_days: int
    retention_household_rollup_5m_days: int
    retention_device_rollup_1h_days: int
    retention_daily_report_days: int
    retention_quarantine_days: int
    retention_alerts_days: int
    lateness_seconds: int
    raw_retention_days: int
    lock_timeout_ms: int = LOCK_TIMEOUT_MS


def report_markdown(report: RetentionReport, purge: RunPurge) -> str:
    """Per-table figures as a markdown table, for the materialization's metadata."""
    lines = [
        "| table | cutoff | partitions dropped | rows removed | MB before | MB after | note |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for t in report.tables.values():
        cut = f"{t.cutoff:%Y-%m-%d %H:%M}" if t.cutoff else "kept forever"
        lines.append(
            f"| {t.table} | {cut} | {len(t.partitions_dropped)} | {t.rows_removed} | "
            f"{t.bytes_before / 1e6:.2f} | {t.bytes_after / 1e6:.2f} | {t.note} |"
        )
    return "\n".join([*lines, "", purge.summary()])


def report_metadata(report: RetentionReport, purge: RunPurge) -> dict[str, dg.MetadataValue]:
    """Totals, per-table figures and the Dagster run purge, as materialization metadata."""
    per_table = {
        t.table: {
            "partitions_dropped": [d.isoformat() for d in t.partitions_dropped],
            "rows_removed": t.rows_removed,
            "bytes_freed": t.bytes_freed,
            "bytes_after": t.bytes_after,
            "note": t.note,
        }
        for t in report.tables.values()
    }
    return {
        "partitions_dropped": dg.MetadataValue.int(report.partitions_dropped),
        "rows_removed": dg.MetadataValue.int(report.rows_removed),
        "bytes_freed": dg.MetadataValue.int(report.bytes_freed),
        "partitions_created_ahead": dg.MetadataValue.int(report.partitions_created),
        "dagster_runs_deleted": dg.MetadataValue.int(purge.runs_deleted),
        "dagster_runs_kept": dg.MetadataValue.int(purge.runs_kept),
        "tables": dg.MetadataValue.json(per_table),
        "summary": dg.MetadataValue.md(report_markdown(report, purge)),
    }


def _repository(context: dg.AssetExecutionContext) -> dg.RepositoryDefinition:
    """The code location's definitions: which partitions exist decides which runs must stay."""
    try:
        return context.repository_def
    except CheckError:
        # Purging without knowing every asset's partitions could delete the runs their status
        # rests on: refuse instead.
        raise dg.Failure(
            "retention needs the code location's definitions to purge Dagster runs: launch "
            "retention_job from the code location (UI, schedule), not a bare in-process job"
        ) from None


def _validated(settings: RetentionSettings) -> RetentionSettings:
    """The settings, if no horizon reaches into data the pipeline may still recompute."""
    try:
        validate_horizons(settings)
    except ConfigError as exc:
        raise dg.Failure(f"retention refuses its settings, nothing was removed: {exc}") from None
    return settings


@dg.asset(group_name="retention", kinds={"postgres"})
def retention(
    context: dg.AssetExecutionContext,
    postgres: PostgresResource,
    retention_settings: RetentionSettings,
) -> dg.MaterializeResult:
    """Day partitions and rows past their horizon removed, and Dagster runs older than the minute
    partition window purged (except those partition status rests on)."""
    # Everything that can refuse is resolved before anything is removed.
    s = _validated(retention_settings)
    partitions = asset_partitions(_repository(context))
    now = datetime.now(UTC)
    with postgres.connect() as conn:
        report = run_retention(
            conn,
            horizons(s),
            timedelta(seconds=s.lateness_seconds),
            now,
            lock_timeout_ms=s.lock_timeout_ms,
        )
    purge = purge_runs(
        context.instance,
        partitions,
        partitions_start(now, s.raw_retention_days),
        now,
    )
    context.log.info(purge.summary())
    return dg.MaterializeResult(metadata=report_metadata(report, purge))
