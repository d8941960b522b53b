"""The `retention` asset: removes what is past its horizon, vacuums the rollup tables' finished
days, and says what it did."""

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
    """Per-table figures as a markdown table, then the vacuums, for the materialization's
    metadata."""
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
    verb = "would vacuum" if report.dry_run else "vacuumed"
    done = [v for v in report.vacuums if v.vacuumed or report.dry_run]
    vacuums = [f"{verb} (ANALYZE): {len(done)} finished day partitions", ""]
    vacuums += [f"- {v.describe()}" for v in done]
    vacuums += [f"- warning: {w}" for w in report.vacuum_warnings]
    return "\n".join([*lines, "", *vacuums, "", purge.summary()])


def report_metadata(report: RetentionReport, purge: RunPurge) -> dict[str, dg.MetadataValue]:
    """Totals, per-table figures, the finished days vacuumed and the Dagster run purge, as
    materialization metadata."""
    per_table = {
        t.table: {
            "partitions_dropped": [d.isoformat() for d in t.partitions_dropped],
            "rows_removed": t.rows_removed,
            "bytes_freed": t.bytes_freed,
            "bytes_after": t.bytes_after,
            "partitions_vacuumed": [
                v.name for v in report.vacuums if v.vacuumed and v.table == t.table
            ],
            "note": t.note,
        }
        for t in report.tables.values()
    }
    vacuums = [
        {
            "partition": v.name,
            "vacuumed": v.vacuumed,
            "rows_since_vacuum": v.rows_since_vacuum,
            "rows_since_analyze": v.rows_since_analyze,
            "all_visible_pages_before": [v.visible_pages, v.pages],
            "all_visible_pages_after": [v.visible_pages_after, v.pages_after],
            "error": v.error,
        }
        for v in report.vacuums
    ]
    return {
        "partitions_dropped": dg.MetadataValue.int(report.partitions_dropped),
        "rows_removed": dg.MetadataValue.int(report.rows_removed),
        "bytes_freed": dg.MetadataValue.int(report.bytes_freed),
        "partitions_created_ahead": dg.MetadataValue.int(report.partitions_created),
        "partitions_vacuumed": dg.MetadataValue.int(report.partitions_vacuumed),
        "vacuum_warnings": dg.MetadataValue.int(len(report.vacuum_warnings)),
        "vacuums": dg.MetadataValue.json(vacuums),
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
    """Day partitions and rows past their horizon removed, the rollup tables' finished days
    vacuumed, and Dagster runs older than the minute partition window purged (except those
    partition status rests on)."""
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
    for warning in report.vacuum_warnings:
        context.log.warning(warning)
    context.log.info(purge.summary())
    return dg.MaterializeResult(metadata=report_metadata(report, purge))
