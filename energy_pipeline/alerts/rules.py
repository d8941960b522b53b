"""Alert rules as code: a YAML file validated into `Rule`s, applied to `energy.alert_rules`.

Applying a file is idempotent: rules in the file are created or updated, rules missing from it
are disabled (kept, because their episodes refer to them), their open episodes are closed
without a notification and their pending streaks dropped. A rule whose condition changed loses
its pending streaks. Every validation error names the rule and the field.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import psycopg
import yaml
from psycopg.types.json import Jsonb
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

Scope = Literal["device", "household", "fleet"]
Window = Literal["1m", "5m"]
Severity = Literal["info", "warning", "critical"]
Channel = Literal["webhook", "slack", "email", "log"]
Operator = Literal[">", ">=", "<", "<=", "==", "!="]
ANOMALY_OPERATOR = "|z|>="

# What can be measured per scope and window: the 1-minute values come from device_rollup_1m (a
# household's or the fleet's draw is the sum of its devices' mean power), the 5-minute ones from
# household_rollup_5m.
METRICS: dict[tuple[str, str], frozenset[str]] = {
    ("device", "1m"): frozenset({"power_w_avg", "power_w_max", "energy_wh_sum", "rejected_ratio"}),
    ("household", "1m"): frozenset({"power_w_avg", "energy_wh_sum", "rejected_ratio"}),
    ("household", "5m"): frozenset({"power_w_avg", "power_w_peak", "energy_wh_sum"}),
    ("fleet", "1m"): frozenset(
        {"power_w_avg", "energy_wh_sum", "rejected_ratio", "reporting_ratio", "pipeline_lag_s"}
    ),
    ("fleet", "5m"): frozenset({"power_w_avg", "energy_wh_sum"}),
}
# Device metadata for quality rules: 'silent' is 1 for a registered device without a minute row.
QUALITY_METRICS = {"silent": ("device", "1m"), "reporting_ratio": ("fleet", "1m")}
ANOMALY_METRIC = "power_w_avg"
_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class RuleFileError(ValueError):
    """A rule file that cannot be applied; `problems` name the rule and the field of each."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def parse_duration(value: int | str) -> int:
    """Seconds in `90`, `"90s"`, `"30m"`, `"2h"` or `"1d"`."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as 30s, 10m or 2h")
    if isinstance(value, int):
        seconds = value
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError("must be a duration such as 30s, 10m or 2h")
        seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds <= 0:
        raise ValueError("must be positive")
    return seconds


class Baseline(BaseModel):
    """The trailing baseline of an anomaly rule (see docs/alerts.md)."""

    model_config = ConfigDict(extra="forbid")
    days: int = Field(default=7, ge=2, le=28)
    min_history: int = Field(default=3, ge=2)
    floor_w: float = Field(default=20.0, gt=0)
    floor_ratio: float = Field(default=0.1, ge=0)


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    name: str | None = None
    description: str | None = None
    scope: Scope = "device"
    entities: list[str] | Literal["all"] = "all"
    window: Window = "1m"
    severity: Severity = "warning"
    runbook_url: str | None = Field(None, pattern=r"^https?://")
    channels: list[Channel] = Field(default=["log"], min_length=1)
    for_windows: int = Field(1, alias="for", ge=1, le=1440)
    cooldown: int | str | None = None

    @field_validator("cooldown")
    @classmethod
    def _cooldown(cls, v: int | str | None) -> int | None:
        return None if v is None else parse_duration(v)

    @field_validator("entities")
    @classmethod
    def _entities(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, list) and (not v or any(not e for e in v)):
            raise ValueError("must be 'all' or a non-empty list of non-empty ids")
        return v


class ThresholdSpec(_Common):
    kind: Literal["threshold"]
    metric: str
    operator: Operator
    threshold: float


class AnomalySpec(_Common):
    kind: Literal["anomaly"]
    metric: Literal["power_w_avg"] = "power_w_avg"
    k: float = Field(3.0, gt=0)
    baseline: Baseline = Baseline()


class QualitySpec(_Common):
    kind: Literal["quality"]
    check: Literal["silent", "rejected_ratio", "reporting", "pipeline_lag"]
    minutes: int | None = Field(None, ge=1, le=1440)
    above_percent: float | None = Field(None, ge=0, le=100)
    below_percent: float | None = Field(None, ge=0, le=100)
    above_seconds: float | None = Field(None, gt=0)


RuleSpec = Annotated[ThresholdSpec | AnomalySpec | QualitySpec, Field(discriminator="kind")]


class RuleFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rules: list[RuleSpec]


@dataclass(frozen=True)
class Rule:
    """One rule as stored in `energy.alert_rules` (anomalies: `threshold` is k)."""

    rule_id: str
    name: str
    kind: str
    scope: str
    metric: str
    window_size: str
    operator: str
    threshold: float
    severity: str
    channels: list[str]
    entity_ids: list[str] | None = None
    for_windows: int = 1
    cooldown_s: int | None = None
    description: str | None = None
    runbook_url: str | None = None
    baseline: dict[str, Any] | None = None
    spec: dict[str, Any] = field(default_factory=dict)


def _quality(spec: QualitySpec) -> tuple[str, str, str, float, int, str]:
    """(scope, metric, operator, threshold, for_windows, field that must be set) of a quality
    rule; the window is always 1 minute."""
    if spec.check == "silent":
        return "device", "silent", "==", 1.0, spec.minutes or 0, "minutes"
    if spec.check == "rejected_ratio":
        value = (spec.above_percent or 0) / 100
        return spec.scope, "rejected_ratio", ">", value, spec.for_windows, "above_percent"
    if spec.check == "reporting":
        value = (spec.below_percent or 0) / 100
        return "fleet", "reporting_ratio", "<", value, spec.for_windows, "below_percent"
    value = spec.above_seconds or 0
    return "fleet", "pipeline_lag_s", ">", value, spec.for_windows, "above_seconds"


def _compile(spec: ThresholdSpec | AnomalySpec | QualitySpec) -> tuple[Rule | None, list[str]]:
    """The stored rule, or the problems (each naming a field) that keep it from being one."""
    problems: list[str] = []
    scope: str = spec.scope
    window, for_windows = spec.window, spec.for_windows
    operator: str
    baseline = None
    if isinstance(spec, ThresholdSpec):
        metric, operator, threshold = spec.metric, spec.operator, spec.threshold
        allowed = METRICS.get((scope, window), frozenset())
        if metric not in allowed:
            problems.append(
                f"metric: {metric!r} is not measured for scope {scope} at window {window} "
                f"(one of {', '.join(sorted(allowed)) or 'none'})"
            )
    elif isinstance(spec, AnomalySpec):
        metric, operator, threshold = spec.metric, ANOMALY_OPERATOR, spec.k
        baseline = spec.baseline.model_dump()
        if scope == "device" and window == "5m":
            problems.append("window: device anomalies are evaluated per minute (use 1m)")
    else:
        scope, metric, operator, threshold, for_windows, needed = _quality(spec)
        if getattr(spec, needed) is None:
            problems.append(f"{needed}: required for check {spec.check}")
        if window != "1m":
            problems.append("window: quality rules are evaluated per minute (use 1m)")
        if spec.check == "silent" and spec.for_windows != 1:
            problems.append("for: a silent-device rule counts its windows with 'minutes'")
    if scope == "fleet" and spec.entities != "all":
        problems.append("entities: a fleet rule has no entity list")
    if problems:
        return None, problems
    return (
        Rule(
            rule_id=spec.id,
            name=spec.name or spec.id,
            description=spec.description,
            kind=spec.kind,
            scope=scope,
            entity_ids=None if spec.entities == "all" else sorted(set(spec.entities)),
            metric=metric,
            window_size=window,
            operator=operator,
            threshold=float(threshold),
            for_windows=for_windows,
            cooldown_s=spec.cooldown,  # type: ignore[arg-type]  # parsed to int above
            severity=spec.severity,
            runbook_url=spec.runbook_url,
            channels=sorted(set(spec.channels)),
            baseline=baseline,
            spec=spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        ),
        [],
    )


def _where(raw: Any, index: int, loc: tuple) -> str:
    """'rule <id>' (or 'rule #n' without an id) and the field path of a pydantic error."""
    rule_id = raw.get("id") if isinstance(raw, dict) else None
    who = f"rule {rule_id!r}" if rule_id else f"rule #{index + 1}"
    # A tagged union puts the kind first in the error's location: not a field of the file.
    if loc and loc[0] in ("threshold", "anomaly", "quality"):
        loc = loc[1:]
    path = [str(p) for p in loc]
    return f"{who}: {'.'.join(path) or 'kind'}"  # a tag error has no location


def parse_rules(text: str) -> list[Rule]:
    """The rules of a YAML document `{rules: [...]}`; `RuleFileError` lists every problem."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RuleFileError([f"not valid YAML: {exc}"]) from None
    if not isinstance(document, dict) or not isinstance(document.get("rules"), list):
        raise RuleFileError(["the file must hold a mapping with a list under 'rules'"])
    raws = document["rules"]
    problems: list[str] = []
    rules: list[Rule] = []
    seen: set[str] = set()
    for index, raw in enumerate(raws):
        try:
            spec = RuleFile.model_validate({"rules": [raw]}).rules[0]
        except ValidationError as exc:
            for err in exc.errors():
                loc = err["loc"][2:]  # drop ('rules', 0)
                problems.append(f"{_where(raw, index, loc)}: {err['msg']}")
            continue
        if spec.id in seen:
            problems.append(f"rule {spec.id!r}: id: defined twice")
        seen.add(spec.id)
        rule, found = _compile(spec)
        problems += [f"rule {spec.id!r}: {p}" for p in found]
        if rule:
            rules.append(rule)
    if problems:
        raise RuleFileError(problems)
    return rules


def load_rules(path: Path) -> list[Rule]:
    """The rules of the YAML file at `path`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RuleFileError([f"{path}: {exc.strerror}"]) from None
    return parse_rules(text)


@dataclass(frozen=True)
class ApplyResult:
    created: list[str]
    updated: list[str]
    unchanged: list[str]
    disabled: list[str]


_COLUMNS = (
    "rule_id, name, description, kind, scope, entity_ids, metric, window_size, operator, "
    "threshold, for_windows, cooldown_s, severity, runbook_url, channels, baseline, spec"
)
# Columns that change what fires: a change drops the rule's pending streaks.
_CONDITION = (
    "kind, scope, entity_ids, metric, window_size, operator, threshold, for_windows, baseline"
)
_UPSERT = f"""
INSERT INTO energy.alert_rules ({_COLUMNS}, enabled)
VALUES (%(rule_id)s, %(name)s, %(description)s, %(kind)s, %(scope)s, %(entity_ids)s, %(metric)s,
        %(window_size)s, %(operator)s, %(threshold)s, %(for_windows)s, %(cooldown_s)s,
        %(severity)s, %(runbook_url)s, %(channels)s, %(baseline)s, %(spec)s, true)
ON CONFLICT (rule_id) DO UPDATE SET
    ({_COLUMNS}, enabled, updated_at) = (
        EXCLUDED.rule_id, EXCLUDED.name, EXCLUDED.description, EXCLUDED.kind, EXCLUDED.scope,
        EXCLUDED.entity_ids, EXCLUDED.metric, EXCLUDED.window_size, EXCLUDED.operator,
        EXCLUDED.threshold, EXCLUDED.for_windows, EXCLUDED.cooldown_s, EXCLUDED.severity,
        EXCLUDED.runbook_url, EXCLUDED.channels, EXCLUDED.baseline, EXCLUDED.spec, true, now())
WHERE (alert_rules.name, alert_rules.description, alert_rules.cooldown_s, alert_rules.severity,
       alert_rules.runbook_url, alert_rules.channels, alert_rules.spec, alert_rules.enabled,
       {", ".join("alert_rules." + c.strip() for c in _CONDITION.split(","))})
      IS DISTINCT FROM
      (EXCLUDED.name, EXCLUDED.description, EXCLUDED.cooldown_s, EXCLUDED.severity,
       EXCLUDED.runbook_url, EXCLUDED.channels, EXCLUDED.spec, true,
       {", ".join("EXCLUDED." + c.strip() for c in _CONDITION.split(","))})
RETURNING (xmax = 0) AS created
"""


def _row(rule: Rule) -> dict[str, Any]:
    row = asdict(rule)
    row["baseline"] = Jsonb(rule.baseline) if rule.baseline is not None else None
    row["spec"] = Jsonb(rule.spec)
    return row


def apply_rules(conn: psycopg.Connection, rules: list[Rule]) -> ApplyResult:
    """Make `energy.alert_rules` hold exactly `rules` enabled, in one transaction."""
    created: list[str] = []
    updated: list[str] = []
    unchanged: list[str] = []
    ids = [r.rule_id for r in rules]
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(hashtext('energy.alert_rules'))")
        for rule in rules:
            cur.execute(
                f"SELECT {_CONDITION} FROM energy.alert_rules WHERE rule_id = %s",
                (rule.rule_id,),
            )
            before = cur.fetchone()
            cur.execute(_UPSERT, _row(rule))
            result = cur.fetchone()
            if result is None:
                unchanged.append(rule.rule_id)
                continue
            (created if result[0] else updated).append(rule.rule_id)
            cur.execute(
                f"SELECT {_CONDITION} FROM energy.alert_rules WHERE rule_id = %s",
                (rule.rule_id,),
            )
            if before is not None and before != cur.fetchone():
                cur.execute("DELETE FROM energy.alert_pending WHERE rule_id = %s", (rule.rule_id,))
        cur.execute(
            "UPDATE energy.alert_rules SET enabled = false, updated_at = now() "
            "WHERE enabled AND rule_id <> ALL(%s) RETURNING rule_id",
            (ids,),
        )
        disabled = sorted(r[0] for r in cur.fetchall())
        if disabled:
            cur.execute("DELETE FROM energy.alert_pending WHERE rule_id = ANY(%s)", (disabled,))
            cur.execute(
                "UPDATE energy.alerts SET state = 'resolved', resolved_at = last_bucket "
                "WHERE state = 'firing' AND rule_id = ANY(%s)",
                (disabled,),
            )
    return ApplyResult(created, updated, unchanged, disabled)


RULE_FIELDS = tuple(c.strip() for c in _COLUMNS.split(","))


def enabled_rules(conn: psycopg.Connection, window: str | None = None) -> list[Rule]:
    """The enabled rules, of one window size when given, ordered by id."""
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM energy.alert_rules WHERE enabled "
        "AND (%(w)s::text IS NULL OR window_size = %(w)s) ORDER BY rule_id",
        {"w": window},
    ).fetchall()
    return [Rule(**dict(zip(RULE_FIELDS, row, strict=True))) for row in rows]


def find_rule(conn: psycopg.Connection, rule_id: str) -> Rule | None:
    """The rule `rule_id`, enabled or not."""
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM energy.alert_rules WHERE rule_id = %s", (rule_id,)
    ).fetchone()
    return Rule(**dict(zip(RULE_FIELDS, row, strict=True))) if row else None


def list_rules(conn: psycopg.Connection) -> list[dict[str, Any]]:
    """Every rule (enabled or not) with its count of open episodes, for `alerts list`."""
    cur = conn.execute(
        "SELECT r.rule_id, r.kind, r.scope, r.metric, r.window_size, r.operator, r.threshold, "
        "r.for_windows, r.cooldown_s, r.severity, r.channels, r.enabled, "
        "(SELECT count(*) FROM energy.alerts a WHERE a.rule_id = r.rule_id "
        " AND a.state = 'firing') AS open_episodes "
        "FROM energy.alert_rules r ORDER BY r.rule_id"
    )
    names = [d.name for d in cur.description or []]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
