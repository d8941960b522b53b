"""The live simulator rides out InfluxDB outages like a device: it buffers, retries, and delivers
every point afterwards with its original timestamp. Runs against a real InfluxDB of its own."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest

from energy_pipeline.config import Settings
from energy_pipeline.devtools.services import LocalInflux, free_port
from energy_pipeline.devtools.simulator import build_fleet, generate_points
from energy_pipeline.devtools.telemetry_writer import (
    NS,
    BufferedWriter,
    SimulationOptions,
    run_live,
)
from energy_pipeline.influx import InfluxClient

DEVICES = 10


@pytest.fixture
def own_influx(tmp_path: Path):
    """An InfluxDB server for this test alone: the session server is shared and must stay up."""
    root = tmp_path / "influx"
    server = LocalInflux(root, free_port())
    server.start()
    yield server
    server.stop()


def _seconds(client: InfluxClient) -> pl.DataFrame:
    """Points per second stored in InfluxDB: `second` (s since epoch), `points`, sorted."""
    points = client.query_frame('SELECT "power_w", "device_id"::tag FROM "telemetry"')
    if points.is_empty():
        return pl.DataFrame(schema={"second": pl.Int64, "points": pl.UInt32})
    return (
        points.group_by((pl.col("time") // NS).alias("second"))
        .agg(pl.len().alias("points"))
        .sort("second")
    )


def _wait_for(check, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def test_simulator_survives_influx_stop_and_start(
    own_influx: LocalInflux, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    client = InfluxClient(own_influx.url, "outage", retries=1, backoff_s=0.1, timeout_s=10)
    client.create_database()
    settings = replace(settings, influx_url=own_influx.url, influx_database="outage")
    stop = threading.Event()
    outcome: dict[str, object] = {}

    def simulate() -> None:
        try:
            outcome["totals"] = run_live(
                client, settings, SimulationOptions(devices=DEVICES), stop=stop
            )
        except BaseException as exc:  # reported by the assertion below
            outcome["error"] = exc

    thread = threading.Thread(target=simulate, daemon=True)
    thread.start()
    try:
        _wait_for(lambda: _seconds(client)["points"].sum() >= 3 * DEVICES, 30)
        own_influx.stop()
        down_at = time.time()
        time.sleep(6)
        assert thread.is_alive(), f"simulator stopped during the outage: {outcome.get('error')!r}"
        up_at = time.time()
        LocalInflux(own_influx.root, own_influx.port).start()
        # Buffered seconds arrive within the writer's backoff after the restart.
        _wait_for(
            lambda: (
                _seconds(client)
                .filter(
                    (pl.col("second") >= int(down_at))
                    & (pl.col("second") < int(up_at))
                    & (pl.col("points") == DEVICES)
                )
                .height
                >= int(up_at) - int(down_at) - 1
            ),
            40,
        )
    finally:
        stop.set()
        thread.join(30)
    assert "error" not in outcome, f"simulator failed: {outcome['error']!r}"
    totals = outcome["totals"]
    assert isinstance(totals, dict)
    per_second = _seconds(client)
    # Every second the simulator generated is stored, complete, at its own timestamp (no gaps).
    assert per_second["points"].sum() == totals["points"] == totals["delivered"]
    assert totals["dropped"] == 0 and totals["unsent"] == 0 and totals["outages"] == 1
    assert per_second["points"].to_list() == [DEVICES] * per_second.height
    span = per_second["second"]
    assert span.max() - span.min() + 1 == per_second.height == totals["seconds"]
    assert span.min() < down_at < up_at < span.max()
    out = capsys.readouterr().out
    assert out.count("InfluxDB unreachable") == 1
    assert out.count("InfluxDB reachable again") == 1
    assert "Retrying" not in out


def test_full_buffer_drops_oldest_points_and_says_so_once(tmp_path: Path) -> None:
    """Nothing listens on the port: the writer keeps the newest points up to its bound."""
    port = free_port()
    client = InfluxClient(f"http://127.0.0.1:{port}", "nowhere", retries=0, timeout_s=2)
    messages: list[str] = []
    writer = BufferedWriter(
        client, "telemetry", max_points=5 * DEVICES, say=messages.append, retry_initial_s=0.05
    )
    fleet = build_fleet(DEVICES)
    for second in range(20):
        writer.put(generate_points(fleet, (1_800_000_000 + second) * NS, 1))
    _wait_for(lambda: writer.outages == 1, 10)
    assert writer.buffered <= 5 * DEVICES
    unsent = writer.close(timeout_s=1)
    assert writer.delivered == 0
    assert writer.dropped + unsent == 20 * DEVICES
    assert writer.dropped >= 15 * DEVICES - DEVICES  # one frame may be in flight, not buffered
    assert sum("buffer full" in m for m in messages) == 1
    assert sum("InfluxDB unreachable" in m for m in messages) == 1


def test_refused_write_is_not_retried_forever(own_influx: LocalInflux) -> None:
    """A 4xx (here: a database that does not exist) is an error to report, not an outage."""
    client = InfluxClient(own_influx.url, f"missing_{os.getpid()}", retries=0)
    writer = BufferedWriter(client, "telemetry", max_points=100, say=lambda _: None)
    writer.put(generate_points(build_fleet(2), 1_800_000_000 * NS, 1))
    _wait_for(lambda: writer.error is not None, 10)
    assert "database not found" in str(writer.error)
    assert writer.close(timeout_s=1) == 2
