"""Asset checks of the alerts domain, per partition, in the same run as the rollup they read.

`alert_rules_1m` (on `device_rollup_1m`: 1-minute thresholds, anomalies, deadman and quality
rules) and `alert_rules_5m` (on `household_rollup_5m`: 5-minute rules) evaluate every rule for
each window of the run, apply the windows to the episodes in order, then deliver the new outbox
rows (fast path; the delivery sensor retries what fails). `rollup_contract_1m` and
`rollup_contract_5m` are blocking: schema drift or impossible aggregates fail the run's step.

Like the hierarchy's checks, each yields one evaluation per window with its own partition (a
ranged run would otherwise record one result without a partition), then the step's output.
"""

from collections.abc import Iterator
from datetime import UTC, datetime

import dagster as dg

from energy_pipeline.alerts.contracts import ContractResult, check_contract
from energy_pipeline.alerts.delivery import deliver_pending
from energy_pipeline.alerts.evaluate import GRAIN_STEP, WindowEvaluation, evaluate_window
from energy_pipeline.alerts.lifecycle import MAX_WAIT, Outcome, apply_windows
from energy_pipeline.alerts.rules import enabled_rules
from energy_pipeline.defs.alerts.resources import AlertChannelsResource
from energy_pipeline.defs.hierarchy.assets import household_rollup_5m
from energy_pipeline.defs.hierarchy.partitions import FIVE_MINUTE_PARTITIONS
from energy_pipeline.resources import PostgresResource

MINUTE_ROLLUP = dg.AssetKey("device_rollup_1m")
HOUSEHOLD_ROLLUP = household_rollup_5m.key
ALERT_RULES = {"1m": "alert_rules_1m", "5m": "alert_rules_5m"}
CONTRACT = {"1m": "rollup_contract_1m", "5m": "rollup_contract_5m"}
TABLE = {"1m": "device_rollup_1m", "5m": "household_rollup_5m"}
# Firing entities listed per partition; the counts cover all of them.
MAX_LISTED = 25


def _windows(context: dg.AssetCheckExecutionContext, grain: str) -> list[datetime]:
    window = context.partition_time_window
    start, end = window.start.astimezone(UTC), window.end.astimezone(UTC)
    step = GRAIN_STEP[grain]
    return [start + i * step for i in range(int((end - start) / step))]


def _firing(ev: WindowEvaluation) -> dict[str, dg.MetadataValue]:
    breached = ev.breached.sort("rule_id", "entity")
    listed = [
        {k: row[k] for k in ("rule_id", "entity_type", "entity", "metric", "value", "z")}
        for row in breached.head(MAX_LISTED).iter_rows(named=True)
    ]
    per_rule = breached.group_by("rule_id").len().sort("rule_id")
    return {
        "conditions_true": dg.MetadataValue.int(breached.height),
        "pairs_evaluated": dg.MetadataValue.int(ev.results.height),
        "rules_true": dg.MetadataValue.json(dict(per_rule.iter_rows())),
        "firing": dg.MetadataValue.json(listed),
        "firing_listed": dg.MetadataValue.int(len(listed)),
    }


def _given_up(outcome: Outcome) -> list[str]:
    return [f"{first:%Y-%m-%d %H:%M}..{last:%Y-%m-%d %H:%M}" for first, last in outcome.given_up]


def _summary(outcome: Outcome, windows: int) -> str:
    if outcome.waiting and not outcome.applied:
        return (
            f"{len(outcome.waiting)} window(s) wait for an older window still to be rolled up "
            "(its run applies them)"
        )
    if not outcome.applied:
        return (
            "windows already applied to the episodes (newest "
            f"{outcome.watermark:%Y-%m-%d %H:%M}): evaluated, nothing notified"
        )
    text = (
        f"{outcome.opened} firing, {outcome.repeated} repeat, {outcome.resolved} resolved "
        f"notification(s); {outcome.suppressed} outbox row(s) suppressed"
    )
    if outcome.skipped:
        text += f"; {len(outcome.skipped)} window(s) already applied changed nothing"
    if windows > 1:
        text += (
            f"; catch-up of {windows} windows: only episodes still open at its end were "
            "notified (the others' rows are recorded as suppressed)"
        )
    return text


def _deliver(
    context: dg.AssetCheckExecutionContext,
    postgres: PostgresResource,
    channels: AlertChannelsResource,
    outcome: Outcome,
) -> str:
    if not outcome.outbox_ids:
        return "nothing to deliver"
    try:
        with postgres.connect() as conn:
            stats = deliver_pending(
                conn,
                channels.channels(),
                datetime.now(UTC),
                outbox_ids=outcome.outbox_ids,
                log=context.log,
            )
    except Exception as exc:  # noqa: BLE001 - the rows are committed: the sensor retries them
        context.log.warning(f"alert delivery left to the retry sensor: {type(exc).__name__}")
        return "left to the retry sensor"
    return stats.describe()


def evaluate_rules(
    context: dg.AssetCheckExecutionContext,
    postgres: PostgresResource,
    alert_channels: AlertChannelsResource,
    grain: str,
    partitions_def: dg.TimeWindowPartitionsDefinition,
) -> Iterator[dg.AssetCheckEvaluation | dg.Output]:
    """Evaluate, apply and deliver; one evaluation per window of the run."""
    windows = _windows(context, grain)
    now = datetime.now(UTC)
    with postgres.connect() as conn:
        rules = enabled_rules(conn, grain)
        evaluations = [evaluate_window(conn, rules, grain, w) for w in windows]
        outcome = apply_windows(conn, rules, evaluations, now)
    if outcome.given_up:
        context.log.warning(
            f"{ALERT_RULES[grain]}: windows never rolled up were skipped after waiting "
            f"{MAX_WAIT}: {', '.join(_given_up(outcome))}"
        )
    seconds = (datetime.now(UTC) - now).total_seconds()
    delivery = _deliver(context, postgres, alert_channels, outcome)
    summary = _summary(outcome, len(windows))
    context.log.info(f"{ALERT_RULES[grain]}: {summary}; delivery: {delivery}")
    asset_key = MINUTE_ROLLUP if grain == "1m" else HOUSEHOLD_ROLLUP
    for ev in evaluations:
        yield dg.AssetCheckEvaluation(
            asset_key=asset_key,
            check_name=ALERT_RULES[grain],
            passed=ev.breached.is_empty(),
            severity=dg.AssetCheckSeverity.WARN,
            partition=partitions_def.get_partition_key_for_timestamp(ev.start.timestamp()),
            metadata={
                **_firing(ev),
                "rules_enabled": len(rules),
                "applied_to_episodes": ev.start in outcome.applied,
                "waiting_for_older_window": ev.start in outcome.waiting,
                "missing_windows_skipped": dg.MetadataValue.json(_given_up(outcome)),
                "summary": summary,
                "delivery": delivery,
                "run_seconds_evaluating": round(seconds, 3),
            },
        )
    yield dg.Output(None)


def _contract_evaluation(
    asset_key: dg.AssetKey,
    grain: str,
    partitions_def: dg.TimeWindowPartitionsDefinition,
    r: ContractResult,
) -> dg.AssetCheckEvaluation:
    return dg.AssetCheckEvaluation(
        asset_key=asset_key,
        check_name=CONTRACT[grain],
        passed=r.passed,
        severity=dg.AssetCheckSeverity.ERROR,
        blocking=True,
        partition=partitions_def.get_partition_key_for_timestamp(r.bucket.timestamp()),
        metadata={
            "rows": r.rows,
            "violations": r.violations,
            "schema_problems": dg.MetadataValue.json(r.schema_problems),
        },
    )


def check_rollup_contract(
    context: dg.AssetCheckExecutionContext,
    postgres: PostgresResource,
    grain: str,
    partitions_def: dg.TimeWindowPartitionsDefinition,
) -> Iterator[dg.AssetCheckEvaluation | dg.Output]:
    """Schema and aggregate sanity of each window's rows; blocking."""
    windows = _windows(context, grain)
    with postgres.connect() as conn:
        results = check_contract(conn, TABLE[grain], windows, GRAIN_STEP[grain])
    asset_key = MINUTE_ROLLUP if grain == "1m" else HOUSEHOLD_ROLLUP
    for result in results:
        if not result.passed:
            context.log.error(f"{CONTRACT[grain]} {result.bucket:%Y-%m-%d %H:%M}: {result}")
        yield _contract_evaluation(asset_key, grain, partitions_def, result)
    yield dg.Output(None)


def build_checks(
    minute_partitions: dg.TimeWindowPartitionsDefinition,
) -> list[dg.AssetChecksDefinition]:
    """The four checks: rules and contract of the minute and of the 5-minute rollup."""
    checks: list[dg.AssetChecksDefinition] = []
    for grain, asset_key, partitions_def in (
        ("1m", MINUTE_ROLLUP, minute_partitions),
        ("5m", HOUSEHOLD_ROLLUP, FIVE_MINUTE_PARTITIONS),
    ):
        checks += [_rules_check(grain, asset_key, partitions_def)]
        checks += [_contract_check(grain, asset_key, partitions_def)]
    return checks


def _rules_check(
    grain: str, asset_key: dg.AssetKey, partitions_def: dg.TimeWindowPartitionsDefinition
) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=asset_key,
        name=ALERT_RULES[grain],
        partitions_def=partitions_def,
        description=f"Every enabled {grain} alert rule for each window: episodes, outbox, "
        "delivery; fails (warning) when a condition is true.",
    )
    def rules_check(
        context: dg.AssetCheckExecutionContext,
        postgres: PostgresResource,
        alert_channels: AlertChannelsResource,
    ):
        yield from evaluate_rules(context, postgres, alert_channels, grain, partitions_def)

    return rules_check


def _contract_check(
    grain: str, asset_key: dg.AssetKey, partitions_def: dg.TimeWindowPartitionsDefinition
) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=asset_key,
        name=CONTRACT[grain],
        partitions_def=partitions_def,
        blocking=True,
        description=f"energy.{TABLE[grain]}: columns as migrated, no impossible aggregates.",
    )
    def contract_check(context: dg.AssetCheckExecutionContext, postgres: PostgresResource):
        yield from check_rollup_contract(context, postgres, grain, partitions_def)

    return contract_check
