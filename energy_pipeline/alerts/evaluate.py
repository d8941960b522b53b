"""Every rule × every entity for one window, at once, in Polars.

A window's values are read once into a long frame (entity_type, entity, metric, value); rules are
a frame too, joined on (entity_type, metric) — or on the entity as well for rules naming ids —
and one expression decides every condition. Anomaly rules join a trailing baseline per entity:
the same UTC hour of day over the previous `days` days, from `device_rollup_1h` (see
docs/alerts.md). No Dagster here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property

import polars as pl
import psycopg

from energy_pipeline.alerts.rules import ANOMALY_OPERATOR, Rule

GRAIN_STEP = {"1m": timedelta(minutes=1), "5m": timedelta(minutes=5)}
FLEET = "fleet"
RESULT_COLUMNS = [
    "rule_id",
    "entity_type",
    "entity",
    "metric",
    "value",
    "breached",
    "z",
    "baseline_mean",
    "baseline_std",
    "baseline_n",
]

# The minute's device rows and the registered devices in one answer: `rolled_up` marks the
# former (a device may be rolled up and not registered), `registered` the latter.
_DEVICE_MINUTE = """
SELECT coalesce(r.device_id, d.device_id) AS device_id,
       coalesce(d.household_id, r.household_id) AS household_id, r.sample_count,
       r.power_w_avg, r.power_w_max, r.energy_wh_sum, r.rejected_count,
       r.device_id IS NOT NULL AS rolled_up, d.device_id IS NOT NULL AS registered
FROM (SELECT device_id, household_id, sample_count, power_w_avg, power_w_max, energy_wh_sum,
             rejected_count
      FROM energy.device_rollup_1m WHERE bucket = %(start)s) r
FULL JOIN energy.devices d ON d.device_id = r.device_id
"""
_LAG = """
SELECT extract(epoch FROM computed_at - (bucket + interval '1 minute'))::float8
FROM energy.rollup_minutes WHERE bucket = %(start)s
"""
_HOUSEHOLD_5M = """
SELECT household_id, power_w_avg, power_w_peak, energy_wh_sum
FROM energy.household_rollup_5m WHERE bucket = %(start)s
"""
# The same UTC hour on each of the previous days: per device, per household (sum of its
# devices' mean power in that hour) and for the fleet.
_BASELINE_ROWS = """
SELECT r.device_id, coalesce(d.household_id, r.household_id) AS household_id, r.bucket,
       r.power_w_avg
FROM energy.device_rollup_1h r LEFT JOIN energy.devices d ON d.device_id = r.device_id
WHERE r.bucket = ANY(%(hours)s) AND r.power_w_avg IS NOT NULL
"""
_BASELINE = {
    "device": f"""
SELECT 'device' AS entity_type, device_id AS entity, avg(power_w_avg) AS mean,
       stddev_samp(power_w_avg) AS std, count(*) AS n
FROM ({_BASELINE_ROWS}) b GROUP BY device_id""",
    "household": f"""
SELECT 'household', household_id, avg(draw), stddev_samp(draw), count(*)
FROM (SELECT household_id, bucket, sum(power_w_avg) AS draw FROM ({_BASELINE_ROWS}) b
      GROUP BY household_id, bucket) h GROUP BY household_id""",
    "fleet": f"""
SELECT 'fleet', 'fleet', avg(draw), stddev_samp(draw), count(*)
FROM (SELECT bucket, sum(power_w_avg) AS draw FROM ({_BASELINE_ROWS}) b GROUP BY bucket) f
HAVING count(*) > 0""",
}
BASELINE_SCHEMA = {
    "entity_type": pl.String,
    "entity": pl.String,
    "mean": pl.Float64,
    "std": pl.Float64,
    "n": pl.Int64,
}


def _frame(conn: psycopg.Connection, query: str, params: dict, schema: dict) -> pl.DataFrame:
    rows = conn.execute(query, params).fetchall()
    return pl.DataFrame(rows, schema=schema, orient="row")


def _long(frame: pl.DataFrame, entity_type: str, entity: str, metrics: list[str]) -> pl.DataFrame:
    """(entity_type, entity, metric, value) rows for `metrics` of `frame`."""
    return (
        frame.select(pl.col(entity).alias("entity"), *[pl.col(m).cast(pl.Float64) for m in metrics])
        .unpivot(index="entity", variable_name="metric", value_name="value")
        .select(pl.lit(entity_type).alias("entity_type"), "entity", "metric", "value")
    )


def _ratio(num: pl.Expr, den: pl.Expr) -> pl.Expr:
    return pl.when(den > 0).then(num / den).otherwise(None)


def _aggregate() -> list[pl.Expr]:
    """A group's draw (sum of mean power, NULL when none had one), energy and rejected ratio."""
    return [
        pl.when(pl.col("power_w_avg").count() > 0)
        .then(pl.col("power_w_avg").sum())
        .alias("power_w_avg"),
        pl.col("energy_wh_sum").sum(),
        _ratio(
            pl.col("rejected_count").sum(),
            pl.col("rejected_count").sum() + pl.col("sample_count").sum(),
        ).alias("rejected_ratio"),
    ]


def minute_values(
    minute: pl.DataFrame, registered: pl.DataFrame, lag_s: float | None
) -> pl.DataFrame:
    """The long frame of one minute: device, household and fleet metrics, quality included.

    `minute`: the minute's device rows; `registered`: device_id of every registered device;
    `lag_s`: seconds from the minute's close to its rollup (None: not in the ledger).
    """
    devices = minute.with_columns(
        _ratio(pl.col("rejected_count"), pl.col("rejected_count") + pl.col("sample_count")).alias(
            "rejected_ratio"
        )
    )
    reporting = devices.filter(pl.col("sample_count") > 0).select("device_id")
    silent = registered.select(
        "device_id",
        (~pl.col("device_id").is_in(reporting["device_id"].implode()))
        .cast(pl.Float64)
        .alias("silent"),
    )
    households = devices.group_by("household_id").agg(_aggregate())
    fleet = devices.select(_aggregate()).with_columns(
        pl.lit(FLEET).alias("entity"),
        pl.lit(
            reporting.height / registered.height if registered.height else None,
            dtype=pl.Float64,
        ).alias("reporting_ratio"),
        pl.lit(lag_s, dtype=pl.Float64).alias("pipeline_lag_s"),
    )
    return pl.concat(
        [
            _long(
                devices,
                "device",
                "device_id",
                ["power_w_avg", "power_w_max", "energy_wh_sum", "rejected_ratio"],
            ),
            _long(silent, "device", "device_id", ["silent"]),
            _long(
                households,
                "household",
                "household_id",
                ["power_w_avg", "energy_wh_sum", "rejected_ratio"],
            ),
            _long(
                fleet,
                "fleet",
                "entity",
                [
                    "power_w_avg",
                    "energy_wh_sum",
                    "rejected_ratio",
                    "reporting_ratio",
                    "pipeline_lag_s",
                ],
            ),
        ]
    )


def five_minute_values(households: pl.DataFrame) -> pl.DataFrame:
    """The long frame of one 5-minute window: households and the fleet."""
    fleet = households.select(
        pl.lit(FLEET).alias("entity"),
        pl.when(pl.col("power_w_avg").count() > 0)
        .then(pl.col("power_w_avg").sum())
        .alias("power_w_avg"),
        pl.col("energy_wh_sum").sum(),
    )
    return pl.concat(
        [
            _long(
                households,
                "household",
                "household_id",
                ["power_w_avg", "power_w_peak", "energy_wh_sum"],
            ),
            _long(fleet, "fleet", "entity", ["power_w_avg", "energy_wh_sum"]),
        ]
    )


def rules_frame(rules: Sequence[Rule]) -> pl.DataFrame:
    """One row per rule with what the vectorised evaluation needs."""
    return pl.DataFrame(
        [
            {
                "rule_id": r.rule_id,
                "entity_type": r.scope,
                "metric": r.metric,
                "operator": r.operator,
                "threshold": r.threshold,
                "entity_ids": r.entity_ids,
                "days": (r.baseline or {}).get("days"),
                "min_history": (r.baseline or {}).get("min_history"),
                "floor_w": (r.baseline or {}).get("floor_w"),
                "floor_ratio": (r.baseline or {}).get("floor_ratio"),
            }
            for r in rules
        ],
        schema={
            "rule_id": pl.String,
            "entity_type": pl.String,
            "metric": pl.String,
            "operator": pl.String,
            "threshold": pl.Float64,
            "entity_ids": pl.List(pl.String),
            "days": pl.Int64,
            "min_history": pl.Int64,
            "floor_w": pl.Float64,
            "floor_ratio": pl.Float64,
        },
    )


def _pairs(values: pl.LazyFrame, rules: pl.DataFrame, extra: Sequence[str] = ()) -> pl.LazyFrame:
    """Every (rule, entity) the rules cover and the window has a value for; `extra` columns of
    the values must match the rule's too."""
    keys = ["entity_type", "metric", *extra]
    everyone = rules.filter(pl.col("entity_ids").is_null()).drop("entity_ids").lazy()
    named = (
        rules.filter(pl.col("entity_ids").is_not_null())
        .explode("entity_ids")
        .rename({"entity_ids": "entity"})
        .lazy()
    )
    columns = values.collect_schema().names() + [
        c for c in everyone.collect_schema().names() if c not in keys
    ]
    return pl.concat(
        [
            values.join(everyone, on=keys).select(columns),
            values.join(named, on=[*keys, "entity"]).select(columns),
        ]
    )


def _thresholds(pairs: pl.LazyFrame) -> pl.LazyFrame:
    # One comparison for every operator: which signs of (value - threshold) breach it.
    diff = pl.col("value") - pl.col("threshold")
    op = pl.col("operator")
    above = op.is_in([">", ">=", "!="]) & (diff > 0)
    below = op.is_in(["<", "<=", "!="]) & (diff < 0)
    equal = op.is_in([">=", "<=", "=="]) & (diff == 0)
    return pairs.with_columns(
        (above | below | equal).fill_null(False).alias("breached"),
        *[pl.lit(None, dtype=pl.Float64).alias(c) for c in ("z", "baseline_mean", "baseline_std")],
        pl.lit(None, dtype=pl.Int64).alias("baseline_n"),
    )


def _anomalies(values: pl.LazyFrame, rules: pl.DataFrame, baselines: pl.DataFrame) -> pl.LazyFrame:
    # Baselines join the window's values per entity first (thousands of rows), and the rules
    # join the result on (scope, metric, days), not the other way round (rules × entities).
    valued = values.join(
        baselines.lazy().rename(
            {"mean": "baseline_mean", "std": "baseline_std", "n": "baseline_n"}
        ),
        on=["entity_type", "entity"],
        how="left",
    ).with_columns(pl.col("baseline_n").cast(pl.Int64), pl.col("days").cast(pl.Int64))
    pairs = _pairs(valued, rules, extra=["days"])
    # The spread never goes below an absolute or a relative floor: a flat device's zero
    # variance cannot divide by zero, and noise around a small mean cannot pass k.
    spread = pl.max_horizontal(
        pl.col("baseline_std").fill_null(0.0),
        pl.col("floor_w"),
        pl.col("floor_ratio") * pl.col("baseline_mean").abs(),
    )
    z = (pl.col("value") - pl.col("baseline_mean")) / spread
    return pairs.with_columns(z.alias("z")).with_columns(
        (
            (pl.col("baseline_n") >= pl.col("min_history"))
            & (pl.col("z").abs() >= pl.col("threshold"))
        )
        .fill_null(False)
        .alias("breached")
    )


def evaluate(
    values: pl.DataFrame, rules: pl.DataFrame, baselines: pl.DataFrame | None = None
) -> pl.DataFrame:
    """Every rule's condition for every entity of the window (RESULT_COLUMNS)."""
    if baselines is None or baselines.is_empty():
        baselines = pl.DataFrame(schema={**BASELINE_SCHEMA, "days": pl.Int64})
    is_anomaly = pl.col("operator") == ANOMALY_OPERATOR
    lazy = values.lazy()
    return pl.concat(
        [
            _thresholds(_pairs(lazy, rules.filter(~is_anomaly))).select(RESULT_COLUMNS),
            _anomalies(lazy, rules.filter(is_anomaly), baselines).select(RESULT_COLUMNS),
        ]
    ).collect()


def read_values(conn: psycopg.Connection, grain: str, start: datetime) -> pl.DataFrame:
    """The long frame of the window of `grain` starting at `start`, read from the rollups."""
    params = {"start": start}
    if grain == "5m":
        households = _frame(
            conn,
            _HOUSEHOLD_5M,
            params,
            {
                "household_id": pl.String,
                "power_w_avg": pl.Float64,
                "power_w_peak": pl.Float64,
                "energy_wh_sum": pl.Float64,
            },
        )
        return five_minute_values(households)
    # Both queries in one round trip.
    with conn.cursor() as rows, conn.cursor() as lag_row:
        with conn.pipeline():
            rows.execute(_DEVICE_MINUTE, params)
            lag_row.execute(_LAG, params)
        fetched, lag = rows.fetchall(), lag_row.fetchone()
    both = pl.DataFrame(
        fetched,
        schema={
            "device_id": pl.String,
            "household_id": pl.String,
            "sample_count": pl.Int64,
            "power_w_avg": pl.Float64,
            "power_w_max": pl.Float64,
            "energy_wh_sum": pl.Float64,
            "rejected_count": pl.Int64,
            "rolled_up": pl.Boolean,
            "registered": pl.Boolean,
        },
        orient="row",
    )
    minute = both.filter(pl.col("rolled_up")).drop("rolled_up", "registered")
    registered = both.filter(pl.col("registered")).select("device_id")
    return minute_values(minute, registered, lag[0] if lag else None)


# Hours of cached baselines kept: the current one and a margin for late or repeated windows.
BASELINE_CACHE_HOURS = 26


def _cache_baselines(conn: psycopg.Connection, scope: str, days: int, hour: datetime) -> None:
    """Compute the hour's baselines of `scope` once (the first evaluation of the hour does)."""
    key = {"hour": hour, "scope": scope, "days": days}
    with conn.transaction():
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('energy.alert_baselines:' || %(scope)s "
            "|| %(days)s::text || %(hour)s::text))",
            key,
        )
        done = conn.execute(
            "SELECT 1 FROM energy.alert_baseline_hours "
            "WHERE hour = %(hour)s AND scope = %(scope)s AND days = %(days)s",
            key,
        ).fetchone()
        if done:
            return
        hours = [hour - timedelta(days=d) for d in range(1, days + 1)]
        cur = conn.execute(
            "INSERT INTO energy.alert_baselines (hour, scope, days, entity, mean, std, n) "
            f"SELECT %(hour)s, %(scope)s, %(days)s, entity, mean, std, n "
            f"FROM ({_BASELINE[scope]}) b(entity_type, entity, mean, std, n)",
            {**key, "hours": hours},
        )
        conn.execute(
            "INSERT INTO energy.alert_baseline_hours (hour, scope, days, entities) "
            "VALUES (%(hour)s, %(scope)s, %(days)s, %(entities)s)",
            {**key, "entities": cur.rowcount},
        )
        old = {"before": hour - timedelta(hours=BASELINE_CACHE_HOURS)}
        conn.execute("DELETE FROM energy.alert_baselines WHERE hour < %(before)s", old)
        conn.execute("DELETE FROM energy.alert_baseline_hours WHERE hour < %(before)s", old)


# The cached baselines of an hour, or no row at all when the hour is not computed yet (a
# computed hour with no entity gives one row with a NULL entity). One statement sees the hour's
# ledger row and its baselines from one snapshot, and both are written in one transaction.
_CACHED = """
SELECT h.scope, b.entity, b.mean, b.std, b.n
FROM energy.alert_baseline_hours h
LEFT JOIN energy.alert_baselines b USING (hour, scope, days)
WHERE h.hour = %(hour)s AND h.scope = %(scope)s AND h.days = %(days)s
"""


def _cached_baselines(
    conn: psycopg.Connection, scope: str, days: int, hour: datetime
) -> pl.DataFrame:
    key = {"hour": hour, "scope": scope, "days": days}
    rows = conn.execute(_CACHED, key).fetchall()
    if not rows:  # the first evaluation of the hour computes them (under a lock), once
        _cache_baselines(conn, scope, days, hour)
        rows = conn.execute(_CACHED, key).fetchall()
    frame = pl.DataFrame(rows, schema=BASELINE_SCHEMA, orient="row")
    return frame.filter(pl.col("entity").is_not_null())


def _computed_baselines(
    conn: psycopg.Connection, scope: str, days: int, hour: datetime
) -> pl.DataFrame:
    """The hour's baselines of `scope`, computed and not cached (writes nothing)."""
    hours = [hour - timedelta(days=d) for d in range(1, days + 1)]
    return _frame(
        conn,
        f"SELECT %(scope)s, entity, mean, std, n "
        f"FROM ({_BASELINE[scope]}) b(entity_type, entity, mean, std, n)",
        {"scope": scope, "hours": hours},
        BASELINE_SCHEMA,
    )


def read_baselines(
    conn: psycopg.Connection, rules: Sequence[Rule], start: datetime, *, cache: bool = True
) -> pl.DataFrame:
    """Trailing baselines for the entity types and day counts the anomaly rules use; cached
    per hour unless `cache` is false (then nothing is written)."""
    hour = start.replace(minute=0, second=0, microsecond=0)
    wanted = sorted(
        {(r.scope, int((r.baseline or {})["days"])) for r in rules if r.kind == "anomaly"}
    )
    frames = []
    for scope, days in wanted:
        frame = (
            _cached_baselines(conn, scope, days, hour)
            if cache
            else _computed_baselines(conn, scope, days, hour)
        )
        frames.append(frame.with_columns(pl.lit(days, dtype=pl.Int64).alias("days")))
    if not frames:
        return pl.DataFrame(schema={**BASELINE_SCHEMA, "days": pl.Int64})
    return pl.concat(frames)


@dataclass(frozen=True)
class WindowEvaluation:
    """Every rule's condition for every entity of one window."""

    grain: str
    start: datetime
    results: pl.DataFrame

    @cached_property
    def breached(self) -> pl.DataFrame:
        # A gather by row number: `filter` first re-aligns the chunks of the joined columns,
        # which costs more than the evaluation's own comparisons.
        return self.results.gather(self.results.get_column("breached").arg_true())


def evaluate_window(
    conn: psycopg.Connection,
    rules: Sequence[Rule],
    grain: str,
    start: datetime,
    *,
    cache: bool = True,
) -> WindowEvaluation:
    """Read the window of `grain` starting at `start` and evaluate `rules` (of that grain);
    with `cache` false it only reads (baselines are computed, not cached)."""
    rules = [r for r in rules if r.window_size == grain]
    values = read_values(conn, grain, start)
    baselines = read_baselines(conn, rules, start, cache=cache)
    results = evaluate(values, rules_frame(rules), baselines)
    return WindowEvaluation(grain, start, results)
