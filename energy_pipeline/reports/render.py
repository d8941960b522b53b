"""Self-contained HTML reports: inline CSS and SVG, no script, nothing fetched from the network.
Every string that comes from data (ids, device names, zones) is escaped. No Dagster here."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from energy_pipeline.reports.pages import FleetPage, HourPoint, HouseholdPage

WIDTH, HEIGHT = 720, 260
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 56, 16, 16, 40
BAR_HEIGHT, BAR_GAP, BAR_LABEL = 26, 10, 220

STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:780px;
color:#1f2933;background:#fff}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.1rem;margin-top:2rem}
.sub{color:#52606d;margin-top:0}
.figures{display:grid;grid-template-columns:repeat(auto-fit,minmax(160px,1fr));gap:.8rem}
.figure{border:1px solid #d9e2ec;border-radius:6px;padding:.6rem .8rem}
.figure b{display:block;font-size:1.3rem}
table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:.3rem .5rem;
border-bottom:1px solid #e4e7eb}td.num,th.num{text-align:right}
svg{max-width:100%;height:auto}.load{fill:none;stroke:#2563eb;stroke-width:2}
.reference{fill:none;stroke:#9aa5b1;stroke-width:2;stroke-dasharray:5 4}
.pt{fill:#2563eb}.bar{fill:#2563eb}.axis{stroke:#9aa5b1}.grid{stroke:#e4e7eb}
svg text{font-size:11px;fill:#52606d}.note{color:#8a6d00}
"""


def esc(value: Any) -> str:
    """Text safe inside HTML and SVG elements and attribute values."""
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: float | None, digits: int = 2, unit: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}{unit}"


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # No script may run and nothing may load from elsewhere, even if a string slipped through.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; img-src data:\">"
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>{body}</body></html>\n"
    )


def _segments(points: Sequence[tuple[float, float] | None]) -> list[list[tuple[float, float]]]:
    """Consecutive points, split where a point is missing (no data: the line shows a gap)."""
    out: list[list[tuple[float, float]]] = [[]]
    for p in points:
        if p is None:
            if out[-1]:
                out.append([])
        else:
            out[-1].append(p)
    return [s for s in out if s]


def _polyline(css: str, segment: list[tuple[float, float]]) -> str:
    coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in segment)
    return f'<polyline class="{css}" points="{coords}"/>'


def load_chart(hours: Sequence[HourPoint], title: str, reference_label: str = "") -> str:
    """An hourly load curve (kWh per hour = mean kW) with an optional dashed reference curve;
    one circle per hour with data (class `pt`), labelled by local clock time."""
    values = [v for h in hours for v in (h.kwh, h.reference_kwh) if v is not None]
    top = max(values, default=0.0) or 1.0
    n = max(len(hours), 1)
    plot_w, plot_h = WIDTH - PAD_LEFT - PAD_RIGHT, HEIGHT - PAD_TOP - PAD_BOTTOM

    def xy(i: int, v: float | None) -> tuple[float, float] | None:
        if v is None:
            return None
        x = PAD_LEFT + (i + 0.5) * plot_w / n
        return x, PAD_TOP + plot_h * (1 - v / top)

    parts = [
        f'<svg class="chart load-chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'data-hours="{len(hours)}" xmlns="http://www.w3.org/2000/svg"><title>{esc(title)}</title>'
    ]
    for k in range(5):
        y = PAD_TOP + plot_h * k / 4
        parts.append(
            f'<line class="grid" x1="{PAD_LEFT}" y1="{y:.1f}" '
            f'x2="{WIDTH - PAD_RIGHT}" y2="{y:.1f}"/>'
            f'<text x="{PAD_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{top * (1 - k / 4):.2f}</text>"
        )
    base = PAD_TOP + plot_h
    parts.append(
        f'<line class="axis" x1="{PAD_LEFT}" y1="{base}" x2="{WIDTH - PAD_RIGHT}" y2="{base}"/>'
    )
    reference = [xy(i, h.reference_kwh) for i, h in enumerate(hours)]
    parts += [_polyline("reference", s) for s in _segments(reference)]
    load = [xy(i, h.kwh) for i, h in enumerate(hours)]
    parts += [_polyline("load", s) for s in _segments(load)]
    for i, (h, p) in enumerate(zip(hours, load, strict=True)):
        if p is not None:
            parts.append(
                f'<circle class="pt" cx="{p[0]:.1f}" cy="{p[1]:.1f}" r="3" '
                f'data-hour="{esc(h.label)}">'
                f"<title>{esc(h.label)}: {h.kwh:.3f} kWh</title></circle>"
            )
        if i % 3 == 0:
            x = PAD_LEFT + (i + 0.5) * plot_w / n
            parts.append(
                f'<text x="{x:.1f}" y="{base + 16}" text-anchor="middle">{esc(h.label)}</text>'
            )
    parts.append(f'<text x="{PAD_LEFT}" y="{HEIGHT - 4}">kWh per hour (local time)</text>')
    if reference_label and any(p is not None for p in reference):
        parts.append(
            f'<text x="{WIDTH - PAD_RIGHT}" y="{HEIGHT - 4}" text-anchor="end">'
            f"dashed: {esc(reference_label)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(items: Sequence[tuple[str, float, str]], title: str) -> str:
    """Horizontal bars (class `bar`), one per (label, value, value text)."""
    top = max((v for _, v, _ in items), default=0.0) or 1.0
    height = max(len(items), 1) * (BAR_HEIGHT + BAR_GAP) + BAR_GAP
    room = WIDTH - BAR_LABEL - 150
    parts = [
        f'<svg class="chart bar-chart" viewBox="0 0 {WIDTH} {height}" role="img" '
        f'data-bars="{len(items)}" xmlns="http://www.w3.org/2000/svg"><title>{esc(title)}</title>'
    ]
    for i, (label, value, text) in enumerate(items):
        y = BAR_GAP + i * (BAR_HEIGHT + BAR_GAP)
        shown = label if len(label) <= 32 else label[:31] + "\u2026"
        parts.append(
            f'<text x="{BAR_LABEL - 8}" y="{y + 17}" text-anchor="end">{esc(shown)}</text>'
            f'<rect class="bar" x="{BAR_LABEL}" y="{y}" width="{max(room * value / top, 1):.1f}" '
            f'height="{BAR_HEIGHT}"><title>{esc(label)}</title></rect>'
            f'<text x="{BAR_LABEL + room * value / top + 6:.1f}" y="{y + 17}">{esc(text)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _figure(label: str, value: str) -> str:
    return f'<div class="figure">{esc(label)}<b>{esc(value)}</b></div>'


def _change(report: dict[str, Any]) -> str:
    change = report["change_pct"]
    return "no history" if change is None else f"{change:+.1f}% vs 7-day avg"


def _cost(report: dict[str, Any]) -> str:
    if report["cost"] is None:
        return "unknown (no tariff)" if report["tariff_id"] is None else "unknown (tariff gap)"
    return f"{report['cost']:,.2f} {report['currency']}"


def _share(share: float | None) -> str:
    return "n/a" if share is None else f"{share:.0%}"


def _local(ts: datetime | None, report: dict[str, Any]) -> str:
    return "n/a" if ts is None else f"{report['peak_local_time']:%H:%M} {report['timezone']}"


def household_html(page: HouseholdPage) -> str:
    """The household's day: figures, hourly load vs its trailing week, top devices."""
    r = page.report
    coverage = r["minutes_covered"] / r["minutes_expected"]
    title = f"Household {r['household_id']} \u2014 {r['day']:%Y-%m-%d}"
    figures = "".join(
        [
            _figure("Energy", f"{r['energy_kwh']:.2f} kWh"),
            _figure("Change", _change(r)),
            _figure(
                "Peak draw", f"{_num(r['peak_power_w'], 0, ' W')} at {_local(r['peak_at'], r)}"
            ),
            _figure("Cost", _cost(r)),
            _figure(
                "Completeness",
                f"{coverage:.1%} ({r['minutes_covered']} of {r['minutes_expected']} min)",
            ),
        ]
    )
    devices = [
        (
            d.get("name") or d["device_id"],
            d["energy_kwh"],
            f"{d['energy_kwh']:.2f} kWh ({_share(d.get('share'))})",
        )
        for d in r["top_devices"]
    ]
    rows = "".join(
        f"<tr><td>{esc(d.get('name') or '')}</td><td><code>{esc(d['device_id'])}</code></td>"
        f'<td class="num">{d["energy_kwh"]:.3f}</td></tr>'
        for d in r["top_devices"]
    )
    notes = []
    if r["minutes_expected"] != 1440:
        notes.append(f"This local day has {r['minutes_expected'] // 60} hours (clock change).")
    if coverage < 1:
        notes.append("Hours without data are left as gaps in the curve.")
    if not page.stored:
        notes.append("Computed on request: no stored report for this day yet.")
    if page.clock_note:
        notes.append(page.clock_note)
    body = (
        f'<h1>{esc(title)}</h1><p class="sub">Local day in {esc(r["timezone"])}, '
        f"{r['day_start']:%Y-%m-%d %H:%M} to {r['day_end']:%Y-%m-%d %H:%M} UTC</p>"
        f'<section class="figures">{figures}</section>'
        "<h2>Hourly load</h2>"
        + load_chart(
            page.hours, f"Hourly load of {r['household_id']}", "average of the previous 7 days"
        )
        + "".join(f'<p class="note">{esc(n)}</p>' for n in notes)
        + "<h2>Top devices</h2>"
        + (bar_chart(devices, "Top devices by energy") if devices else "<p>No device data.</p>")
        + (
            f'<table><tr><th>Name</th><th>Device</th><th class="num">kWh</th></tr>{rows}</table>'
            if rows
            else ""
        )
        + f'<p class="sub">Generated {r["generated_at"]:%Y-%m-%d %H:%M} UTC'
        + (f", tariff {esc(r['tariff_id'])}" if r["tariff_id"] else "")
        + "</p>"
    )
    return _page(title, body)


def fleet_html(page: FleetPage) -> str:
    """The fleet's day: totals, load by local hour, top households, data quality."""
    title = f"Fleet overview \u2014 {page.day:%Y-%m-%d}"
    completeness = page.completeness
    figures = "".join(
        [
            _figure("Energy", f"{page.total_kwh:,.1f} kWh"),
            _figure("Households", f"{len(page.reports)} ({page.with_data} with data)"),
            _figure("Complete days", f"{page.complete} of {len(page.reports)}"),
            _figure("Minutes covered", "n/a" if completeness is None else f"{completeness:.1%}"),
        ]
    )
    top = [(r["household_id"], r["energy_kwh"], f"{r['energy_kwh']:.2f} kWh") for r in page.top]
    quality = "".join(
        f"<tr><td><code>{esc(r['household_id'])}</code></td><td>{esc(r['timezone'])}</td>"
        f'<td class="num">{r["minutes_covered"]}</td><td class="num">{r["minutes_expected"]}</td>'
        f'<td class="num">{r["minutes_covered"] / r["minutes_expected"]:.1%}</td></tr>'
        for r in page.incomplete[:50]
    )
    more = len(page.incomplete) - 50
    body = (
        f'<h1>{esc(title)}</h1><p class="sub">Each household\'s own local day '
        f'{page.day:%Y-%m-%d}</p><section class="figures">{figures}</section>'
        "<h2>Load by local hour</h2>"
        + load_chart(page.hours, "Fleet load by local hour")
        + "<h2>Top households</h2>"
        + (bar_chart(top, "Top households by energy") if top else "<p>No reports for this day.</p>")
        + "<h2>Data quality</h2>"
        + (
            '<table><tr><th>Household</th><th>Zone</th><th class="num">Minutes covered</th>'
            f'<th class="num">Expected</th><th class="num">Share</th></tr>{quality}</table>'
            if quality
            else "<p>Every household's day is at least 90% covered.</p>"
        )
        + (f"<p>\u2026 and {more} more.</p>" if more > 0 else "")
    )
    return _page(title, body)


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~])")


def md(value: Any) -> str:
    """Text safe inside markdown (no markup, no HTML, no table breaks)."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(value).split()))


def fleet_markdown(page: FleetPage) -> str:
    """A short summary of the fleet's day for Dagster's metadata view."""
    completeness = page.completeness
    lines = [
        f"**{page.total_kwh:,.1f} kWh** across {len(page.reports)} households "
        f"({page.with_data} with data, {page.complete} complete); minutes covered "
        f"{'n/a' if completeness is None else f'{completeness:.1%}'}.",
        "",
        "| household | kWh | change | completeness |",
        "|---|---:|---:|---:|",
    ]
    for r in page.top[:5]:
        change = "n/a" if r["change_pct"] is None else f"{r['change_pct']:+.1f}%"
        lines.append(
            f"| {md(r['household_id'])} | {r['energy_kwh']:.2f} | {change} | "
            f"{r['minutes_covered'] / r['minutes_expected']:.1%} |"
        )
    if page.incomplete:
        lines += ["", f"{len(page.incomplete)} households below 90% of their minutes."]
    return "\n".join(lines)
