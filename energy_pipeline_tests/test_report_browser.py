"""The rendered reports in a real headless browser (Debian's chromium): each page loads, its SVG
charts hold the expected points and bars after the browser parsed them, and the browser logs no
console message (a blocked script or resource would log one). Skipped only when chromium is not
installed; CI installs it."""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import UTC, date, datetime
from html.parser import HTMLParser
from pathlib import Path

import pytest

from energy_pipeline import storage
from energy_pipeline.reports.compute import replace_day
from energy_pipeline.reports.files import write_atomically
from energy_pipeline.reports.pages import fleet_page, household_page
from energy_pipeline.reports.render import fleet_html, household_html
from energy_pipeline_tests.test_reports import (  # noqa: F401 - fixtures
    DST_DAY,
    NORMAL_DAY,
    dataset,
    loaded_dsn,
    loaded_template,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
CONSOLE = re.compile(r":CONSOLE[:(]\d*\)?\]? ?(.*)")


class Dom(HTMLParser):
    """Element tags with their attributes, from the DOM the browser serialised."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    def count(self, tag: str, css: str) -> int:
        return sum(1 for t, a in self.elements if t == tag and a.get("class") == css)


def browse(page: Path, profile: Path) -> tuple[Dom, list[str]]:
    """Load `page` in headless chromium: the DOM after load, and the console messages."""
    assert CHROMIUM is not None
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",  # the suite may run as root
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    dom = Dom()
    dom.feed(done.stdout)
    console = [m.group(1) for line in done.stderr.splitlines() if (m := CONSOLE.search(line))]
    return dom, console


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chromium-profile")


def test_console_messages_are_seen(tmp_path: Path, profile: Path):
    """The console capture itself works: a page that logs an error is caught."""
    probe = tmp_path / "probe.html"
    probe.write_text("<!DOCTYPE html><p>x</p><script>console.error('probe-error')</script>")
    dom, console = browse(probe, profile)
    assert dom.elements and any("probe-error" in m for m in console)


@pytest.mark.parametrize(
    ("household", "day", "hours", "min_points", "max_points", "bars"),
    [
        ("hh-ny", NORMAL_DAY, 24, 24, 24, 1),  # a normal day, one device
        ("hh-berlin", DST_DAY, 23, 23, 23, 3),  # 23-hour day in Europe/Berlin
        ("hh-kat", DST_DAY, 24, 20, 21, 2),  # 3 hours without data, +05:45 zone
    ],
)
def test_household_page_renders_in_chromium(
    loaded_dsn,  # noqa: F811 - the fixture imported above
    tmp_path,
    profile,
    household,
    day,
    hours,
    min_points,
    max_points,
    bars,
):
    with storage.connect(loaded_dsn) as conn:
        page = household_page(conn, household, day)
    assert page is not None
    out = tmp_path / f"{household}.html"
    write_atomically(out, household_html(page))
    dom, console = browse(out, profile)
    assert console == []
    charts = [a for t, a in dom.elements if t == "svg" and "load-chart" in (a.get("class") or "")]
    assert [c["data-hours"] for c in charts] == [str(hours)]
    with_data = sum(1 for h in page.hours if h.kwh is not None)
    assert min_points <= dom.count("circle", "pt") == with_data <= max_points
    assert dom.count("rect", "bar") == bars
    assert dom.count("polyline", "reference") >= 1  # the trailing week is there on these days
    titles = [t for t, _ in dom.elements if t == "h1"]
    assert titles == ["h1"]


def test_fleet_page_renders_in_chromium(loaded_dsn, tmp_path, profile):  # noqa: F811
    with storage.connect(loaded_dsn) as conn:
        replace_day(conn, DST_DAY, datetime(2026, 3, 31, tzinfo=UTC))
        page = fleet_page(conn, DST_DAY)
        empty = fleet_page(conn, date(2026, 3, 10))  # no report stored for this day
    out = tmp_path / "fleet.html"
    write_atomically(out, fleet_html(page))
    dom, console = browse(out, profile)
    assert console == []
    assert dom.count("circle", "pt") == 24 and dom.count("rect", "bar") == 3
    write_atomically(out, fleet_html(empty))
    dom, console = browse(out, profile)
    assert console == [] and dom.count("circle", "pt") == 0 and dom.count("rect", "bar") == 0
