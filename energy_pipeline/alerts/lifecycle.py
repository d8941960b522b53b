"""Episodes: pending → firing → repeat (after the cooldown) → resolved, and their outbox rows.

Windows of a grain are applied to the episodes in time order, once each: a window no newer than
the newest one applied (`energy.alert_evaluations`, the watermark) changes nothing, so re-running a
minute, a late-data recompute of an older minute, or two runs racing (serialised on an advisory
lock per grain) never notify twice. The watermark only moves over contiguous windows: a window
whose older neighbour is not rolled up yet waits (it is not applied); the run of that older window
then applies it too, from its stored rows, in order. A missing window older than `MAX_WAIT` is
given up (skipped, and reported) so a hole that is never repaired does not hold alerts back.
Episode changes, pending streaks, outbox rows and the watermark are written in one transaction;
each outbox row's idempotency key is unique as well.

A range of windows (a catch-up run) is applied window by window, but only episodes still open at
its end are notified: notifications of an episode opened and resolved inside the range, repeats
of episodes it opened, and repeats but the last of older ones, are written as suppressed rows.
No Dagster here.
"""

from __future__ import annotations

import functools
import json
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import polars as pl
import psycopg

from energy_pipeline.alerts.evaluate import GRAIN_STEP, WindowEvaluation, evaluate_window
from energy_pipeline.alerts.rules import ANOMALY_OPERATOR, Rule

CATCH_UP = "catch-up: episode opened and resolved within the evaluated range"
CATCH_UP_REPEAT = "catch-up: superseded by a later repeat in the evaluated range"
CATCH_UP_OPENED = "catch-up: the episode opened in the evaluated range; its firing notice stands"

Key = tuple[str, str]
# How long after its close a window that is not rolled up holds back the newer ones.
MAX_WAIT = timedelta(minutes=10)
# Where each grain records its rolled-up windows.
_READY = {
    "1m": "SELECT bucket FROM energy.rollup_minutes WHERE bucket >= %s",
    "5m": "SELECT bucket FROM energy.rollup_windows "
    "WHERE grain = 'household_rollup_5m' AND bucket >= %s",
}


@dataclass
class Pending:
    first: datetime
    last: datetime
    windows: int


@dataclass
class Episode:
    rule_id: str
    entity: str
    entity_type: str
    started_at: datetime
    first_value: float | None
    last_value: float | None
    last_bucket: datetime
    last_notified_at: datetime
    repeats: int = 0
    resolved_at: datetime | None = None
    alert_id: int | None = None
    opened_here: bool = False
    changed: bool = False


@dataclass
class Event:
    episode: Episode
    kind: str  # firing, repeat, resolved
    seq: int
    bucket: datetime
    result: dict[str, Any]
    suppressed: str | None = None


@dataclass
class Outcome:
    """What applying windows did; `outbox_ids` are the rows to deliver now."""

    applied: list[datetime] = field(default_factory=list)
    skipped: list[datetime] = field(default_factory=list)
    # Windows of the run not applied yet: an older window is still to be rolled up.
    waiting: list[datetime] = field(default_factory=list)
    # (first, last) of each run of missing windows given up after `MAX_WAIT`.
    given_up: list[tuple[datetime, datetime]] = field(default_factory=list)
    watermark: datetime | None = None
    opened: int = 0
    repeated: int = 0
    resolved: int = 0
    outbox_ids: list[int] = field(default_factory=list)
    suppressed: int = 0


@dataclass
class _State:
    pending: dict[Key, Pending]
    open: dict[Key, Episode]
    closed: list[Episode] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


def grain_lock(grain: str) -> str:
    return f"energy.alerts:{grain}"


def _load_state(cur: psycopg.Cursor, rule_ids: list[str]) -> _State:
    cur.execute(
        "SELECT rule_id, entity, first_bucket, last_bucket, windows FROM energy.alert_pending "
        "WHERE rule_id = ANY(%s)",
        (rule_ids,),
    )
    pending = {(r, e): Pending(f, la, w) for r, e, f, la, w in cur.fetchall()}
    cur.execute(
        "SELECT rule_id, entity, entity_type, started_at, first_value, last_value, last_bucket, "
        "last_notified_at, repeats, alert_id FROM energy.alerts "
        "WHERE state = 'firing' AND rule_id = ANY(%s)",
        (rule_ids,),
    )
    episodes = {
        (row[0], row[1]): Episode(*row[:9], alert_id=row[9])  # type: ignore[misc]
        for row in cur.fetchall()
    }
    return _State(pending, episodes)


def _step(state: _State, rules: dict[str, Rule], ev: WindowEvaluation) -> None:
    """Advance pending streaks and episodes by one window."""
    step = GRAIN_STEP[ev.grain]
    window = ev.start
    breached = {(r["rule_id"], r["entity"]): r for r in ev.breached.iter_rows(named=True)}
    for key, result in breached.items():
        rule = rules[key[0]]
        episode = state.open.get(key)
        if episode is not None:
            episode.last_value, episode.last_bucket, episode.changed = result["value"], window, True
            cooldown = rule.cooldown_s
            if cooldown and window - episode.last_notified_at >= timedelta(seconds=cooldown):
                episode.repeats += 1
                episode.last_notified_at = window
                state.events.append(Event(episode, "repeat", episode.repeats, window, result))
            continue
        streak = state.pending.get(key)
        if streak is not None and streak.last == window - step:
            streak.last, streak.windows = window, streak.windows + 1
        else:
            streak = state.pending[key] = Pending(window, window, 1)
        if streak.windows >= rule.for_windows:
            del state.pending[key]
            episode = Episode(
                key[0], key[1], result["entity_type"], streak.first, result["value"],
                result["value"], window, window, opened_here=True, changed=True,
            )  # fmt: skip
            state.open[key] = episode
            state.events.append(Event(episode, "firing", 0, window, result))
    for key in [k for k in state.pending if k not in breached]:
        del state.pending[key]
    cleared = [k for k in state.open if k not in breached]
    if not cleared:
        return
    values = _values_of(ev, cleared)
    for key in cleared:
        # No value (the entity sent nothing in this window): the episode stays open; silence
        # is the deadman rule's business.
        if values.get(key, {}).get("value") is None:
            continue
        episode = state.open.pop(key)
        episode.resolved_at, episode.changed = window, True
        result = values[key]
        state.closed.append(episode)
        state.events.append(Event(episode, "resolved", 0, window, result))


def _values_of(ev: WindowEvaluation, keys: list[Key]) -> dict[Key, dict[str, Any]]:
    wanted = pl.DataFrame(keys, schema={"rule_id": pl.String, "entity": pl.String}, orient="row")
    # The rows of the wanted entities first (a cheap one-column test), then the exact pairs:
    # hashing (rule, entity) over every pair of the window costs more than the rest of a step.
    results = ev.results
    near = results.gather(
        results.get_column("entity")
        .is_in(wanted.get_column("entity").unique().implode())
        .arg_true()
    )
    found = near.join(wanted, on=["rule_id", "entity"], how="semi")
    return {(r["rule_id"], r["entity"]): r for r in found.iter_rows(named=True)}


def _catch_up(state: _State) -> None:
    """Suppress what a catch-up range must not send: episodes that did not outlive the range,
    repeats of episodes it opened, and all but the last repeat of older episodes."""
    last_repeat: dict[int, Event] = {}
    for event in state.events:
        episode = event.episode
        if episode.opened_here and episode.resolved_at is not None:
            event.suppressed = CATCH_UP
        elif event.kind == "repeat" and episode.opened_here:
            event.suppressed = CATCH_UP_OPENED
        elif event.kind == "repeat":
            earlier = last_repeat.get(id(episode))
            if earlier is not None:
                earlier.suppressed = CATCH_UP_REPEAT
            last_repeat[id(episode)] = event


_UPDATE_EPISODES = """
UPDATE energy.alerts a SET state = u.state, last_value = u.last_value,
       last_bucket = u.last_bucket, resolved_at = u.resolved_at,
       last_notified_at = u.last_notified_at, repeats = u.repeats
FROM unnest(%b::bigint[], %b::text[], %b::float8[], %b::timestamptz[], %b::timestamptz[],
            %b::timestamptz[], %b::integer[])
     AS u(alert_id, state, last_value, last_bucket, resolved_at, last_notified_at, repeats)
WHERE a.alert_id = u.alert_id
"""
_INSERT_EPISODES = """
INSERT INTO energy.alerts (state, last_value, last_bucket, resolved_at, last_notified_at, repeats,
                           rule_id, entity, entity_type, grain, started_at, first_value)
SELECT state, last_value, last_bucket, resolved_at, last_notified_at, repeats, rule_id, entity,
       entity_type, %s, started_at, first_value
FROM unnest(%b::text[], %b::float8[], %b::timestamptz[], %b::timestamptz[], %b::timestamptz[],
            %b::integer[], %b::text[], %b::text[], %b::text[], %b::timestamptz[], %b::float8[])
     WITH ORDINALITY AS n(state, last_value, last_bucket, resolved_at, last_notified_at, repeats,
                          rule_id, entity, entity_type, started_at, first_value, ordinal)
ORDER BY ordinal
RETURNING alert_id, rule_id, entity, started_at
"""


def _columns(rows: list[tuple]) -> list[list]:
    """Rows as one list per column: each becomes one array parameter of an `unnest`."""
    return [list(column) for column in zip(*rows, strict=True)]


def _write_episodes(cur: psycopg.Cursor, episodes: list[Episode], grain: str) -> None:
    """Changed episodes in one UPDATE, new ones in one INSERT (in episode order)."""

    def values(ep: Episode) -> tuple:
        state = "resolved" if ep.resolved_at else "firing"
        return (
            state, ep.last_value, ep.last_bucket, ep.resolved_at, ep.last_notified_at, ep.repeats,
        )  # fmt: skip

    new = [ep for ep in episodes if ep.alert_id is None]
    changed = [ep for ep in episodes if ep.alert_id is not None and ep.changed]
    # Updates first: an episode resolved in this batch frees its (rule, entity) for a new one.
    if changed:
        cur.execute(_UPDATE_EPISODES, _columns([(ep.alert_id, *values(ep)) for ep in changed]))
    if new:
        cur.execute(
            _INSERT_EPISODES,
            [grain, *_columns([(*values(ep), ep.rule_id, ep.entity, ep.entity_type,
                                ep.started_at, ep.first_value) for ep in new])],
        )  # fmt: skip
        # (rule, entity, start) is unique, in the table and so in the batch.
        ids = {(r, e, s): alert_id for alert_id, r, e, s in cur.fetchall()}
        for ep in new:
            ep.alert_id = ids[(ep.rule_id, ep.entity, ep.started_at)]


def _write_pending(cur: psycopg.Cursor, rule_ids: list[str], pending: dict[Key, Pending]) -> None:
    cur.execute("DELETE FROM energy.alert_pending WHERE rule_id = ANY(%s)", (rule_ids,))
    if pending:
        cur.execute(
            "INSERT INTO energy.alert_pending (rule_id, entity, first_bucket, last_bucket, "
            "windows) SELECT * FROM unnest(%b::text[], %b::text[], %b::timestamptz[], "
            "%b::timestamptz[], %b::integer[])",
            _columns([(r, e, p.first, p.last, p.windows) for (r, e), p in pending.items()]),
        )


def _silence(silences: list[tuple], rule_id: str, entity: str) -> str | None:
    """Why a notification of `rule_id` for `entity` is silenced, or None."""
    for s_rule, s_entity, until, reason in silences:
        if (s_rule is None or s_rule == rule_id) and (s_entity is None or s_entity == entity):
            return f"silenced until {until.isoformat()}" + (f": {reason}" if reason else "")
    return None


def _iso(ts: datetime | None) -> str | None:
    return ts.isoformat() if ts else None


def payload(rule: Rule, event: Event, grain: str) -> dict[str, Any]:
    """Everything a channel renders for one notification."""
    ep, result = event.episode, event.result
    value = result.get("value")
    data: dict[str, Any] = {
        "rule_id": rule.rule_id,
        "rule_name": rule.name,
        "description": rule.description,
        "kind": event.kind,
        "severity": rule.severity,
        "entity_type": ep.entity_type,
        "entity": ep.entity,
        "metric": rule.metric,
        "value": value,
        "window_start": event.bucket.isoformat(),
        "window_end": (event.bucket + GRAIN_STEP[grain]).isoformat(),
        "started_at": ep.started_at.isoformat(),
        "resolved_at": _iso(ep.resolved_at),
        "runbook_url": rule.runbook_url,
    }
    if rule.operator == ANOMALY_OPERATOR:
        data |= {
            "k": rule.threshold,
            "z": result.get("z"),
            "baseline_mean": result.get("baseline_mean"),
            "baseline_std": result.get("baseline_std"),
            "baseline_n": result.get("baseline_n"),
        }
        condition = f"|z| = {abs(result.get('z') or 0):.1f} (k {rule.threshold:g})"
    else:
        data |= {"operator": rule.operator, "threshold": rule.threshold}
        condition = f"{rule.metric} {rule.operator} {rule.threshold:g}"
    shown = "no data" if value is None else f"{value:g}"
    verb = {"firing": "FIRING", "repeat": "STILL FIRING", "resolved": "RESOLVED"}[event.kind]
    data["summary"] = (
        f"[{rule.severity.upper()}] {verb}: {rule.name} — {ep.entity_type} {ep.entity}: "
        f"{rule.metric} = {shown} ({condition}) in {event.bucket:%Y-%m-%d %H:%M} UTC"
    )
    return data


@functools.lru_cache(maxsize=1 << 16)
def _quoted(part: str) -> str:
    # The same rules and entities come back every window.
    return urllib.parse.quote(part, safe="")


def idempotency_key(ep: Episode, event: Event) -> str:
    """rule:entity:start:kind:seq, rule and entity percent-encoded so no ':' of theirs can make
    two different pairs share a key; plain ids read as they are."""
    rule, entity = _quoted(ep.rule_id), _quoted(ep.entity)
    return f"{rule}:{entity}:{ep.started_at.isoformat()}:{event.kind}:{event.seq}"


_OUTBOX_COLUMNS = (
    "idempotency_key, alert_id, rule_id, entity, channel, kind, payload, suppressed, "
    "next_attempt_at"
)
# One INSERT in event order: a key written before (a re-run) is skipped and returns nothing.
# The rows travel as one JSON array (one `json.dumps`, no per-value adaptation); each payload
# is parsed once, as part of it.
_INSERT_OUTBOX = f"""
INSERT INTO energy.alert_outbox ({_OUTBOX_COLUMNS})
SELECT idempotency_key, alert_id, rule_id, entity, channel, kind, payload, suppressed,
       %s::timestamptz
FROM ROWS FROM (jsonb_to_recordset(%s::jsonb)
                AS (idempotency_key text, alert_id bigint, rule_id text, entity text,
                    channel text, kind text, payload jsonb, suppressed text))
     WITH ORDINALITY AS n(idempotency_key, alert_id, rule_id, entity, channel, kind, payload,
                          suppressed, ordinal)
ORDER BY ordinal
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING outbox_id, suppressed IS NOT NULL
"""


def _write_outbox(
    cur: psycopg.Cursor, rules: dict[str, Rule], events: list[Event], grain: str, now: datetime
) -> tuple[list[int], int]:
    """One row per event and channel; returns the ids to deliver and the suppressed count."""
    if not events:
        return [], 0
    cur.execute(
        "SELECT rule_id, entity, until, reason FROM energy.alert_silences WHERE until > %s "
        "ORDER BY until DESC",
        (now,),
    )
    silences = cur.fetchall()
    rows = []
    for event in events:
        ep, rule = event.episode, rules[event.episode.rule_id]
        reason = event.suppressed or _silence(silences, ep.rule_id, ep.entity)
        body = payload(rule, event, grain)
        key = idempotency_key(ep, event)
        for channel in rule.channels:
            rows.append(
                {
                    "idempotency_key": f"{key}:{channel}",
                    "alert_id": ep.alert_id,
                    "rule_id": ep.rule_id,
                    "entity": ep.entity,
                    "channel": channel,
                    "kind": event.kind,
                    "payload": body,
                    "suppressed": reason,
                }
            )
    if not rows:
        return [], 0
    cur.execute(_INSERT_OUTBOX, (now, json.dumps(rows)))
    written = cur.fetchall()
    to_send = sorted(outbox_id for outbox_id, held in written if not held)
    suppressed = sum(1 for _, held in written if held)
    return to_send, suppressed


def _plan(
    cur: psycopg.Cursor,
    grain: str,
    watermark: datetime | None,
    given: list[datetime],
    now: datetime,
    max_wait: timedelta,
) -> tuple[list[datetime], list[tuple[datetime, datetime]]]:
    """The windows to apply now, in order, and the runs of missing windows given up.

    From the watermark on, every window is either one of the run's (`given`), rolled up before
    (stored), or missing; the plan stops at the first missing window younger than `max_wait`.
    """
    step = GRAIN_STEP[grain]
    first = watermark + step if watermark else min(given)
    cur.execute(_READY[grain], (first,))
    candidates = sorted({*given, *(row[0] for row in cur.fetchall())})
    plan: list[datetime] = []
    given_up: list[tuple[datetime, datetime]] = []
    cursor = first
    for window in candidates:
        if window > cursor:  # windows cursor … window - step are missing
            if window + max_wait > now:
                break
            given_up.append((cursor, window - step))
        plan.append(window)
        cursor = window + step
    return plan, given_up


def apply_windows(
    conn: psycopg.Connection,
    rules: Sequence[Rule],
    evaluations: Sequence[WindowEvaluation],
    now: datetime,
    *,
    max_wait: timedelta = MAX_WAIT,
) -> Outcome:
    """Apply the evaluated windows of one grain to the episodes, in order, in one transaction.

    Windows no newer than the grain's watermark are skipped. Windows after a missing one wait
    (see the module's docstring); stored windows that waited for these are evaluated and applied
    after them. With more than one window in the run, only episodes open at the end are notified
    (the others' rows are written suppressed).
    """
    outcome = Outcome()
    if not evaluations:
        return outcome
    grain = evaluations[0].grain
    by_id = {r.rule_id: r for r in rules if r.window_size == grain}
    rule_ids = sorted(by_id)
    given = {e.start: e for e in evaluations}
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (grain_lock(grain),))
        cur.execute("SELECT last_bucket FROM energy.alert_evaluations WHERE grain = %s", (grain,))
        row = cur.fetchone()
        watermark = row[0] if row else None
        outcome.watermark = watermark
        outcome.skipped = sorted(w for w in given if watermark and w <= watermark)
        newer = [w for w in given if not (watermark and w <= watermark)]
        if not newer:
            return outcome
        plan, outcome.given_up = _plan(cur, grain, watermark, newer, now, max_wait)
        outcome.waiting = sorted(set(newer) - set(plan))
        if not plan:
            return outcome
        state = _load_state(cur, rule_ids)
        for window in plan:
            ev = given.get(window) or evaluate_window(conn, rules, grain, window)
            _step(state, by_id, ev)
        if len(evaluations) > 1:
            _catch_up(state)
        episodes = [*state.open.values(), *state.closed]
        _write_episodes(cur, episodes, grain)
        _write_pending(cur, rule_ids, state.pending)
        outcome.outbox_ids, outcome.suppressed = _write_outbox(cur, by_id, state.events, grain, now)
        cur.execute(
            "INSERT INTO energy.alert_evaluations (grain, last_bucket, evaluated_at) "
            "VALUES (%s, %s, %s) ON CONFLICT (grain) DO UPDATE SET "
            "last_bucket = EXCLUDED.last_bucket, evaluated_at = EXCLUDED.evaluated_at",
            (grain, plan[-1], now),
        )
    outcome.applied = plan
    outcome.watermark = plan[-1]
    kinds = [e.kind for e in state.events if not e.suppressed]
    outcome.opened, outcome.repeated = kinds.count("firing"), kinds.count("repeat")
    outcome.resolved = kinds.count("resolved")
    return outcome


def add_silence(
    conn: psycopg.Connection,
    until: datetime,
    *,
    rule_id: str | None = None,
    entity: str | None = None,
    reason: str | None = None,
) -> int:
    """Record a silence of a rule, an entity, or both; returns its id."""
    if rule_id is None and entity is None:
        raise ValueError("a silence names a rule, an entity or both")
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO energy.alert_silences (rule_id, entity, until, reason) "
            "VALUES (%s, %s, %s, %s) RETURNING silence_id",
            (rule_id, entity, until, reason),
        ).fetchone()
    return int(row[0])  # type: ignore[index]


def history(conn: psycopg.Connection, since: datetime, limit: int = 200) -> list[dict[str, Any]]:
    """Episodes started since `since`, newest first, with their notification counts."""
    cur = conn.execute(
        "SELECT a.alert_id, a.rule_id, a.entity_type, a.entity, a.state, a.started_at, "
        "a.resolved_at, a.first_value, a.last_value, a.repeats, "
        "count(o.outbox_id) FILTER (WHERE o.suppressed IS NULL) AS notifications, "
        "count(o.outbox_id) FILTER (WHERE o.suppressed IS NOT NULL) AS suppressed "
        "FROM energy.alerts a LEFT JOIN energy.alert_outbox o ON o.alert_id = a.alert_id "
        "WHERE a.started_at >= %s GROUP BY a.alert_id ORDER BY a.started_at DESC, a.alert_id "
        "LIMIT %s",
        (since, limit),
    )
    names = [d.name for d in cur.description or []]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
