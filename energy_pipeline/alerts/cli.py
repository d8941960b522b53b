"""`energy-pipeline alerts …`: apply a rule file, list rules, test a rule against stored rollups,
silence a rule or an entity, show the episodes."""

from __future__ import annotations

import argparse
import difflib
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from energy_pipeline.alerts.evaluate import GRAIN_STEP, evaluate_window
from energy_pipeline.alerts.lifecycle import add_silence, history
from energy_pipeline.alerts.rules import (
    RuleFileError,
    apply_rules,
    find_rule,
    list_rules,
    load_rules,
    parse_duration,
)
from energy_pipeline.config import Settings
from energy_pipeline.storage import connect

MAX_SHOWN = 50


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")


def _err(line: str) -> None:
    sys.stderr.write(f"energy-pipeline alerts: {line}\n")


def parse_time(text: str, now: datetime, *, ahead: bool) -> datetime:
    """An ISO 8601 time (UTC unless it names an offset), or a duration (`2h`, `30m`) ahead of
    or before `now`."""
    try:
        return now + (1 if ahead else -1) * timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO time (2026-11-28T03:00Z) nor a duration (2h)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    cells = [[("" if r[c] is None else str(r[c])) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    _out("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        _out("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def cmd_apply(args: argparse.Namespace, settings: Settings) -> int:
    try:
        rules = load_rules(Path(args.file))
    except RuleFileError as exc:
        _err(f"{args.file} was not applied (nothing changed):")
        for problem in exc.problems:
            sys.stderr.write(f"  {problem}\n")
        return 2
    with connect(settings.pg_dsn) as conn:
        result = apply_rules(conn, rules)
    for label, ids in (
        ("created", result.created),
        ("updated", result.updated),
        ("unchanged", result.unchanged),
        ("disabled (not in the file)", result.disabled),
    ):
        _out(f"{label}: {len(ids)}" + (f" ({', '.join(ids)})" if ids else ""))
    return 0


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    with connect(settings.pg_dsn) as conn:
        rows = list_rules(conn)
    if not rows:
        _out("no rules; apply a file with `energy-pipeline alerts apply FILE`")
        return 0
    for row in rows:
        row["channels"] = ",".join(row["channels"])
    _table(rows, list(rows[0]))
    return 0


def cmd_test(args: argparse.Namespace, settings: Settings) -> int:
    """Evaluate one rule for the window holding `--at`; changes and sends nothing."""
    at = parse_time(args.at, datetime.now(UTC), ahead=False)
    with connect(settings.pg_dsn) as conn:
        # Read only: any write (a baseline cache row included) fails instead of happening.
        conn.execute("SET default_transaction_read_only = on")
        rule = find_rule(conn, args.rule)
        if rule is None:
            _err(f"no rule {args.rule!r} (see `energy-pipeline alerts list`)")
            return 2
        step = GRAIN_STEP[rule.window_size]
        start = datetime.fromtimestamp(
            at.timestamp() // step.total_seconds() * step.total_seconds(), UTC
        )
        ev = evaluate_window(conn, [rule], rule.window_size, start, cache=False)
    breached = ev.breached.sort("entity")
    _out(
        f"rule {rule.rule_id} ({rule.kind}, {rule.scope} {rule.metric} {rule.operator} "
        f"{rule.threshold:g}), window {start:%Y-%m-%d %H:%M}..{start + step:%H:%M} UTC: "
        f"{breached.height} of {ev.results.height} entities would be true"
        + (f"; it fires after {rule.for_windows} windows in a row" if rule.for_windows > 1 else "")
    )
    shown = breached.head(MAX_SHOWN).to_dicts()
    if shown:
        _table(shown, ["entity", "value", "z", "baseline_mean", "baseline_std", "baseline_n"])
    if breached.height > MAX_SHOWN:
        _out(f"… and {breached.height - MAX_SHOWN} more")
    return 0


_KNOWN_ENTITY = """
SELECT 1 FROM energy.devices WHERE device_id = %(name)s OR household_id = %(name)s
UNION ALL SELECT 1 WHERE %(name)s = 'fleet'
LIMIT 1
"""


def _unknown_target(conn: psycopg.Connection, name: str) -> str | None:
    """A warning when `name` is neither a rule nor a registered device, a household or the
    fleet (a mistyped rule id would otherwise silence an entity that matches nothing)."""
    if conn.execute(_KNOWN_ENTITY, {"name": name}).fetchone():
        return None
    rules = [row["rule_id"] for row in list_rules(conn)]
    close = difflib.get_close_matches(name, rules, n=1)
    hint = f"; did you mean the rule {close[0]!r}?" if close else ""
    return (
        f"warning: {name!r} is neither a rule nor a known device, household or the fleet: the "
        f"silence matches nothing until such an entity reports{hint}"
    )


def cmd_silence(args: argparse.Namespace, settings: Settings) -> int:
    """Silence a rule (when the name is a rule's id) or an entity (any other name).

    A name that is no known entity either is still recorded (a device can be silenced before it
    is registered, e.g. ahead of an installation) but warned about, on stderr and in the output.
    """
    now = datetime.now(UTC)
    until = parse_time(args.until, now, ahead=True)
    if until <= now:
        _err(f"--until {args.until} is not in the future")
        return 2
    with connect(settings.pg_dsn) as conn:
        is_rule = find_rule(conn, args.target) is not None
        warning = None if is_rule else _unknown_target(conn, args.target)
        target = {"rule_id": args.target} if is_rule else {"entity": args.target}
        silence_id = add_silence(conn, until, reason=args.reason, **target)
    what = "rule" if is_rule else "entity"
    _out(f"silence {silence_id}: {what} {args.target} until {until.isoformat()}")
    if warning:
        _err(warning)
        _out(warning)
    return 0


def cmd_history(args: argparse.Namespace, settings: Settings) -> int:
    since = parse_time(args.since, datetime.now(UTC), ahead=False)
    with connect(settings.pg_dsn) as conn:
        rows = history(conn, since, args.limit)
    if not rows:
        _out(f"no episodes since {since.isoformat()}")
        return 0
    _table(rows, list(rows[0]))
    return 0


COMMANDS = {
    "apply": cmd_apply,
    "list": cmd_list,
    "test": cmd_test,
    "silence": cmd_silence,
    "history": cmd_history,
}


def cmd_alerts(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return COMMANDS[args.action](args, settings)
    except argparse.ArgumentTypeError as exc:  # a time argument that does not parse
        _err(str(exc))
        return 2


def add_parser(sub: Any) -> None:
    """Add `alerts` and its actions to the `energy-pipeline` subcommands."""
    p = sub.add_parser("alerts", help="alert rules: apply, list, test, silence, history")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("apply", help="make the rules in PostgreSQL those of a YAML file")
    a.add_argument("file")
    actions.add_parser("list", help="every rule, enabled or not, with its open episodes")
    a = actions.add_parser("test", help="evaluate a rule against stored rollups; sends nothing")
    a.add_argument("rule")
    a.add_argument("--at", required=True, help="ISO time or a duration ago (10m)")
    a = actions.add_parser("silence", help="suppress a rule's or an entity's notifications")
    a.add_argument("target", metavar="RULE|ENTITY")
    a.add_argument("--until", required=True, help="ISO time or a duration from now (2h)")
    a.add_argument("--reason")
    a = actions.add_parser("history", help="episodes and their notifications")
    a.add_argument("--since", default="24h", help="ISO time or a duration ago (default 24h)")
    a.add_argument("--limit", type=int, default=200)
    p.set_defaults(func=cmd_alerts)
