"""`energy-pipeline report …` (a household's day as HTML) and `energy-pipeline tariffs apply …`."""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

from energy_pipeline.config import Settings
from energy_pipeline.reports import tariffs
from energy_pipeline.reports.files import write_atomically
from energy_pipeline.reports.pages import household_page
from energy_pipeline.reports.render import household_html
from energy_pipeline.storage import connect


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")


def _err(line: str) -> int:
    sys.stderr.write(f"energy-pipeline: {line}\n")
    return 2


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    try:
        day = date.fromisoformat(args.date)
    except ValueError:
        return _err(f"--date {args.date!r} is not a date YYYY-MM-DD")
    with connect(settings.pg_dsn) as conn:
        page = household_page(conn, args.household, day)
    if page is None:
        return _err(f"household {args.household!r} has no registered device and no data")
    out = (
        Path(args.out)
        if args.out
        else settings.reports_dir
        / "households"
        / (f"{day.isoformat()}-{args.household.replace('/', '_')}.html")
    )
    write_atomically(out, household_html(page))
    r = page.report
    _out(
        f"{out}: {r['energy_kwh']:.2f} kWh, {r['minutes_covered']}/{r['minutes_expected']} "
        f"minutes{'' if page.stored else ' (computed now, not stored)'}"
    )
    return 0


def cmd_tariffs(args: argparse.Namespace, settings: Settings) -> int:
    try:
        parsed = tariffs.load(Path(args.file))
        with connect(settings.pg_dsn) as conn:
            done = tariffs.apply(conn, parsed)
    except (tariffs.TariffError, OSError) as exc:
        return _err(f"{args.file}: {exc}")
    _out(f"applied {done['tariffs']} tariffs and {done['assignments']} assignments")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The `report` and `tariffs` commands."""
    p = sub.add_parser("report", help="render one household's day as a self-contained HTML page")
    p.add_argument("--household", required=True)
    p.add_argument("--date", required=True, help="the household's local day, YYYY-MM-DD")
    p.add_argument("--out", help="HTML file (default: <reports dir>/households/DAY-ID.html)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("tariffs", help="tariffs and their assignment to households")
    t = p.add_subparsers(dest="action", required=True)
    a = t.add_parser("apply", help="apply a tariff file (.yaml, or .csv of bands or assignments)")
    a.add_argument("file")
    p.set_defaults(func=cmd_tariffs)
