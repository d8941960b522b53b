"""Dagster asset: each household's report of its local day, and the fleet overview page."""

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import dagster as dg

from energy_pipeline.defs.reports.partitions import (
    DAILY_REPORT_PARTITIONS,
    PARTITION_FMT,
    UPSTREAM_WINDOWS,
)
from energy_pipeline.reports.compute import ReportWrite, replace_day, zone_notes
from energy_pipeline.reports.files import write_atomically
from energy_pipeline.reports.pages import fleet_page
from energy_pipeline.reports.render import fleet_html, fleet_markdown, md
from energy_pipeline.resources import PostgresResource

REPORTS_GROUP = "reports"
MAX_ZONE_NOTES = 20


class ReportOutputResource(dg.ConfigurableResource):
    """Where rendered report pages are written."""

    reports_dir: str

    def fleet_path(self, day: date) -> Path:
        return Path(self.reports_dir) / "fleet" / f"{day.isoformat()}.html"


def days_of(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> list[date]:
    """The local days of the run's partitions (one, or a backfill's range)."""
    window = context.partition_time_window
    first, end = window.start.astimezone(UTC).date(), window.end.astimezone(UTC).date()
    return [first + timedelta(days=i) for i in range((end - first).days)]


def _zone_metadata(notes: list) -> dict:
    if not notes:
        return {"households_with_mixed_zones": 0}
    lines = [
        f"- {md(n.household_id)}: {', '.join(md(z) for z in n.zones)}"
        + (" (a zone PostgreSQL does not know: reported in UTC)" if n.unknown_zone else "")
        for n in notes[:MAX_ZONE_NOTES]
    ]
    return {
        "households_with_mixed_zones": len(notes),
        "zone_rule": dg.MetadataValue.md(
            "Devices of these households are in several zones; each is reported in the zone "
            "most of its devices have (ties: the first by name).\n\n" + "\n".join(lines)
        ),
    }


@dg.asset(
    group_name=REPORTS_GROUP,
    partitions_def=DAILY_REPORT_PARTITIONS,
    deps=[
        dg.AssetDep("household_rollup_5m", partition_mapping=UPSTREAM_WINDOWS),
        dg.AssetDep("device_rollup_1h", partition_mapping=UPSTREAM_WINDOWS),
    ],
    backfill_policy=dg.BackfillPolicy.single_run(),
    kinds={"postgres", "html"},
)
def household_daily_report(
    context: dg.AssetExecutionContext,
    postgres: PostgresResource,
    report_output: ReportOutputResource,
) -> dg.MaterializeResult:
    """Each household's energy, peak, top devices, cost and completeness over its own local day,
    in `energy.household_daily_report`; the fleet overview page of each day."""
    began = datetime.now(UTC)
    writes: list[ReportWrite] = []
    # Fails before any row is written when the pages cannot be.
    report_output.fleet_path(date.today()).parent.mkdir(parents=True, exist_ok=True)
    with postgres.connect() as conn:
        for day in days_of(context):
            w = replace_day(conn, day, datetime.now(UTC))
            writes.append(w)
            page = fleet_page(conn, day)
            path = report_output.fleet_path(day)
            write_atomically(path, fleet_html(page))
            # A ranged run's result lands on every day it covers: each day gets its own figures.
            context.add_asset_metadata(
                {
                    "households": w.households,
                    "households_with_data": w.households_with_data,
                    "total_kwh": round(w.total_kwh, 3),
                    "source_computed_at": (
                        w.source_computed_at.isoformat() if w.source_computed_at else ""
                    ),
                    "fleet_overview": dg.MetadataValue.path(str(path)),
                    "fleet_overview_url": dg.MetadataValue.url(path.resolve().as_uri()),
                    "summary": dg.MetadataValue.md(fleet_markdown(page)),
                },
                partition_key=day.strftime(PARTITION_FMT),
            )
        notes = zone_notes(conn)
    return dg.MaterializeResult(
        metadata={
            "run_days": len(writes),
            "run_rows_written": sum(w.households for w in writes),
            "run_seconds": round((datetime.now(UTC) - began).total_seconds(), 3),
            **_zone_metadata(notes),
        }
    )
