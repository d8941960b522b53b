"""Purging Dagster's own storage: finished runs (with their event logs) older than the minute
partition window, except the runs partition status still rests on.

Dagster tracks which partitions are materialized in a status cache per asset, rebuilt from the
event log whenever the asset's partitions definition changes (here, every UTC midnight, when the
rolling starts move). Deleting a run deletes its events, so a run holding the latest
materialization of a partition that still exists is kept: its partition stays materialized in the
UI, with its latest metadata. So is a run holding the latest attempt of a partition that never
succeeded since (a failed partition stays failed). Runs whose partitions all left the window go.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import dagster as dg
from dagster._core.events import DagsterEventType

FINISHED = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]
RUN_PAGE = 500
FETCH_BATCH = 500
# Runs deleted per purge at most (about 90 ms each measured on a busy 2-core machine, so ~30
# min): a first purge of a long backlog spreads over days instead of outlasting the job's 1 h.
MAX_DELETES = 20_000


@dataclass
class RunPurge:
    """What purging Dagster's runs removed (or, dry, would remove)."""

    created_before: datetime
    dry_run: bool
    runs_deleted: int = 0
    runs_kept: int = 0
    runs_left: int = 0
    kept_run_ids: set[str] = field(default_factory=set, repr=False)

    def summary(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        left = f", {self.runs_left} left for the next purge" if self.runs_left else ""
        return (
            f"Dagster runs created before {self.created_before:%Y-%m-%d %H:%M} UTC: {verb} "
            f"{self.runs_deleted}, kept {self.runs_kept} (latest materialization or attempt of a "
            f"partition that still exists){left}"
        )


def _chunks(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def status_runs(
    instance: dg.DagsterInstance,
    assets: Mapping[dg.AssetKey, dg.PartitionsDefinition | None],
    now: datetime,
) -> set[str]:
    """Ids of the runs holding the latest materialization, and the latest attempt not followed by
    one, of each existing partition of `assets` (of an unpartitioned asset: its latest
    materialization)."""
    keep: set[str] = set()
    storage = instance.event_log_storage
    with dg.partition_loading_context(effective_dt=now, dynamic_partitions_store=instance):
        for key, partitions_def in assets.items():
            if partitions_def is None:
                latest = instance.get_latest_materialization_event(key)
                if latest is not None:
                    keep.add(latest.run_id)
                continue
            by_partition = storage.get_latest_storage_id_by_partition(
                key, DagsterEventType.ASSET_MATERIALIZATION
            )
            ids = sorted(
                sid for p, sid in by_partition.items() if partitions_def.has_partition_key(p)
            )
            for chunk in _chunks(ids, FETCH_BATCH):
                records = instance.fetch_materializations(
                    dg.AssetRecordsFilter(asset_key=key, storage_ids=list(chunk)), limit=len(chunk)
                ).records
                keep |= {r.run_id for r in records}
            attempts = storage.get_latest_asset_partition_materialization_attempts_without_materializations(  # noqa: E501
                key
            )
            keep |= {
                run_id for p, (run_id, _) in attempts.items() if partitions_def.has_partition_key(p)
            }
    return keep


def old_finished_runs(instance: dg.DagsterInstance, created_before: datetime) -> list[str]:
    """Ids of finished runs created before `created_before`, oldest first, read page by page."""
    ids: list[str] = []
    cursor = None
    while True:
        page = instance.get_run_records(
            dg.RunsFilter(statuses=FINISHED, created_before=created_before),
            limit=RUN_PAGE,
            ascending=True,
            cursor=cursor,
        )
        ids += [r.dagster_run.run_id for r in page]
        if len(page) < RUN_PAGE:
            return ids
        cursor = page[-1].dagster_run.run_id


def purge_runs(
    instance: dg.DagsterInstance,
    assets: Mapping[dg.AssetKey, dg.PartitionsDefinition | None],
    created_before: datetime,
    now: datetime,
    *,
    dry_run: bool = False,
    max_deletes: int = MAX_DELETES,
) -> RunPurge:
    """Delete finished runs created before `created_before` and their event logs, keeping the
    runs partition status rests on (see module doc). Safe to run again: it deletes only what is
    still there."""
    result = RunPurge(created_before=created_before, dry_run=dry_run)
    keep = status_runs(instance, assets, now)
    for run_id in old_finished_runs(instance, created_before):
        if run_id in keep:
            result.runs_kept += 1
            result.kept_run_ids.add(run_id)
            continue
        if result.runs_deleted >= max_deletes:
            result.runs_left += 1
            continue
        if not dry_run:
            instance.delete_run(run_id)
        result.runs_deleted += 1
    return result


def asset_partitions(
    repository: dg.RepositoryDefinition,
) -> dict[dg.AssetKey, dg.PartitionsDefinition | None]:
    """Every materializable asset of a repository with its partitions definition."""
    graph = repository.asset_graph
    return {key: graph.get(key).partitions_def for key in graph.materializable_asset_keys}
