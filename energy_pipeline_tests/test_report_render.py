"""Rendering of the reports (pure): escaping of hostile strings, charts with one point per hour
holding data, clock-change days, nothing fetched from the network."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from energy_pipeline.reports.files import write_atomically
from energy_pipeline.reports.pages import (
    FleetPage,
    HourPoint,
    HouseholdPage,
    hour_labels,
    trailing_hourly,
)
from energy_pipeline.reports.render import (
    fleet_html,
    fleet_markdown,
    household_html,
    load_chart,
    md,
)

HOSTILE = "</title><script>alert(\"x\")</script><img src=x onerror=alert(1)> & 'q'"


def report(**overrides: Any) -> dict[str, Any]:
    base = {
        "household_id": "hh-<b>1</b>",
        "day": date(2026, 3, 29),
        "timezone": "Europe/Berlin",
        "day_start": datetime(2026, 3, 28, 23, tzinfo=UTC),
        "day_end": datetime(2026, 3, 29, 22, tzinfo=UTC),
        "energy_kwh": 12.5,
        "peak_power_w": 3456.0,
        "peak_at": datetime(2026, 3, 29, 17, 5, tzinfo=UTC),
        "peak_local_time": time(19, 5),
        "top_devices": [
            {"device_id": "d1", "name": HOSTILE, "energy_kwh": 6.0, "share": 0.48},
            {"device_id": "d2<", "name": None, "energy_kwh": 4.0, "share": 0.32},
        ],
        "trailing_avg_kwh": 10.0,
        "change_pct": 25.0,
        "tariff_id": "tou&eur",
        "cost": Decimal("3.1234"),
        "currency": "EUR",
        "minutes_covered": 1200,
        "minutes_expected": 1380,
        "generated_at": datetime(2026, 3, 30, 13, tzinfo=UTC),
    }
    return base | overrides


def berlin_dst_hours(missing: set[int]) -> list[HourPoint]:
    labels = hour_labels(datetime(2026, 3, 28, 23, tzinfo=UTC), 23, "Europe/Berlin")
    return [
        HourPoint(label, None if i in missing else 0.5 + i / 10, 0.6)
        for i, label in enumerate(labels)
    ]


class Collector(HTMLParser):
    """Tags and attributes as a browser's parser sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def parsed(page: str) -> list[tuple[str, dict[str, str | None]]]:
    collector = Collector()
    collector.feed(page)
    return collector.tags


def test_hour_labels_follow_the_local_clock_on_change_days():
    spring = hour_labels(datetime(2026, 3, 28, 23, tzinfo=UTC), 23, "Europe/Berlin")
    assert "02:00" not in spring and spring[:3] == ["00:00", "01:00", "03:00"]
    autumn = hour_labels(datetime(2026, 10, 24, 22, tzinfo=UTC), 25, "Europe/Berlin")
    assert autumn.count("02:00") == 2 and len(autumn) == 25
    kathmandu = hour_labels(datetime(2026, 3, 28, 18, 15, tzinfo=UTC), 24, "Asia/Kathmandu")
    assert kathmandu[0] == "00:00" and kathmandu[-1] == "23:00"


def test_trailing_hourly_averages_over_days_with_data():
    rows = [(date(2026, 3, 1), 0, 2.0), (date(2026, 3, 1), 1, 4.0), (date(2026, 3, 2), 0, 1.0)]
    assert trailing_hourly(rows) == {0: 1.5, 1: 2.0}
    assert trailing_hourly([]) == {}


def test_household_page_escapes_every_data_string_and_loads_nothing():
    page = household_html(HouseholdPage(report(), berlin_dst_hours(set()), stored=True))
    tags = parsed(page)
    assert not [t for t, _ in tags if t in ("script", "img", "iframe", "link", "object")]
    assert not [a for _, attrs in tags for a in attrs if a.startswith("on")]
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "hh-&lt;b&gt;1&lt;/b&gt;" in page and "tou&amp;eur" in page
    # Nothing is fetched: no src/href attributes, no url(), no links but the SVG namespace.
    assert not [a for _, attrs in tags for a in attrs if a in ("src", "href", "xlink:href")]
    assert "url(" not in page
    assert set(re.findall(r"https?://[^\"' ]+", page)) == {"http://www.w3.org/2000/svg"}


def test_load_chart_has_one_point_per_hour_with_data_and_gaps_where_none():
    hours = berlin_dst_hours(missing={4, 5, 6, 20})
    svg = load_chart(hours, "t", "reference")
    tags = parsed(svg)
    points = [a for t, a in tags if t == "circle" and a.get("class") == "pt"]
    assert len(points) == 23 - 4
    assert "02:00" not in {p["data-hour"] for p in points}
    loads = [a for t, a in tags if t == "polyline" and a.get("class") == "load"]
    assert len(loads) == 3  # 0-3, 7-19, 21-22
    assert sum(len((a["points"] or "").split()) for a in loads) == 19
    assert [a for t, a in tags if t == "svg"][0]["data-hours"] == "23"


def test_household_page_says_when_data_is_missing_and_days_are_short():
    page = household_html(
        HouseholdPage(
            report(
                minutes_covered=0,
                energy_kwh=0.0,
                peak_power_w=None,
                peak_at=None,
                peak_local_time=None,
                top_devices=[],
                cost=None,
                tariff_id=None,
                change_pct=None,
                trailing_avg_kwh=None,
            ),
            berlin_dst_hours(missing=set(range(23))),
            stored=False,
        )
    )
    assert "23 hours (clock change)" in page and "gaps in the curve" in page
    assert "No device data." in page and "unknown (no tariff)" in page and "no history" in page
    assert 'class="pt"' not in page


def test_fleet_page_and_markdown_escape_household_ids():
    rows = [
        report(household_id=f"hh|{i}*", energy_kwh=float(i), minutes_covered=1380 - 100 * i)
        for i in range(4)
    ]
    hours = [HourPoint(f"{h:02d}:00", float(h)) for h in range(24)]
    page = FleetPage(date(2026, 3, 29), rows, hours, top=rows[::-1], incomplete=rows[2:])
    html_page = fleet_html(page)
    tags = parsed(html_page)
    assert len([a for t, a in tags if t == "rect" and a.get("class") == "bar"]) == 4
    assert len([a for t, a in tags if t == "circle" and a.get("class") == "pt"]) == 24
    summary = fleet_markdown(page)
    assert "hh\\|3\\*" in summary and "| hh|" not in summary
    assert md("<a href=x>[y](z)</a>") == "\\<a href=x\\>\\[y\\]\\(z\\)\\</a\\>"


@pytest.mark.parametrize("count", [0, 1, 3])
def test_top_device_bars(count):
    devices = [
        {"device_id": f"d{i}", "name": f"n{i}", "energy_kwh": 1.0 + i, "share": 0.1}
        for i in range(count)
    ]
    page = household_html(HouseholdPage(report(top_devices=devices), [], stored=True))
    assert page.count('class="bar"') == count


def test_day_bounds_in_the_page_are_utc():
    page = household_html(HouseholdPage(report(), [], stored=True))
    assert "2026-03-28 23:00 to 2026-03-29 22:00 UTC" in page
    assert timedelta(hours=23) == report()["day_end"] - report()["day_start"]


def test_report_asset_module_does_not_load_the_command_line():
    # The asset writes pages through a pure module, not through the command line's.
    code = (
        "import sys, energy_pipeline.defs.reports.assets; "
        "print('energy_pipeline.reports.cli' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_write_atomically_replaces_the_page_and_keeps_it_on_failure(tmp_path: Path):
    page = tmp_path / "fleet" / "2026-03-29.html"
    write_atomically(page, "first")
    write_atomically(page, "second")
    assert page.read_text() == "second"
    with pytest.raises(TypeError):
        write_atomically(page, None)  # type: ignore[arg-type]
    assert page.read_text() == "second"
    assert [p.name for p in page.parent.iterdir()] == [page.name]


def test_reports_package_and_modules_say_what_they_hold():
    import importlib
    import pkgutil

    import energy_pipeline.reports as package

    names = [package.__name__] + [
        f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)
    ]
    assert "energy_pipeline.reports.files" in names
    for name in names:
        doc = importlib.import_module(name).__doc__
        assert doc and len(doc.split()) >= 5, name
