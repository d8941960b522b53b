"""Live freshness: the simulator and the real Dagster daemon, with run timings."""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import replace as dataclasses_replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from energy_pipeline.config import Settings
from energy_pipeline.devtools.bench import live_alerts
from energy_pipeline.devtools.bench.common import (
    BenchOptions,
    BenchTargets,
    Progress,
    pct,
    prepare_postgres,
)
from energy_pipeline.devtools.dagster_stack import dagster_env, dagster_home, start_daemon
from energy_pipeline.devtools.dagster_stack import stop as stop_process
from energy_pipeline.devtools.simulator import build_fleet
from energy_pipeline.devtools.telemetry_writer import SimulationOptions, run_live
from energy_pipeline.hierarchy import HOUSEHOLD_5M
from energy_pipeline.influx import quote_ident
from energy_pipeline.storage import connect


def _dagster_run_timings(dagster_dsn: str, since: float) -> list[dict[str, float]]:
    """Sensor-launched single-minute runs: seconds from minute close to request, start, success."""
    with psycopg.connect(dagster_dsn) as conn:
        rows = conn.execute(
            "SELECT p.value, extract(epoch FROM r.create_timestamp AT TIME ZONE 'UTC'), "
            "r.start_time, r.end_time FROM runs r "
            "JOIN run_tags o ON o.run_id = r.run_id AND o.key = 'energy/origin' "
            "AND o.value = 'minutes' "
            "JOIN run_tags p ON p.run_id = r.run_id AND p.key = 'dagster/partition' "
            "WHERE r.status = 'SUCCESS' AND r.start_time >= %s",
            (since,),
        ).fetchall()
    out = []
    for key, created, started, ended in rows:
        closed = datetime.strptime(key, "%Y-%m-%d-%H:%M").replace(tzinfo=UTC).timestamp() + 60
        out.append({"wait_for_sensor_s": float(created) - closed,
                    "launch_s": started - float(created), "run_s": ended - started,
                    "close_to_success_s": ended - closed})  # fmt: skip
    return out


def _household_window_timings(live_pg_dsn: str, since: float) -> list[dict[str, float]]:
    """Complete household 5-minute windows that began after `since`: seconds from the window's
    end, and from its last minute's rollup, to the household rows (`rollup_windows.computed_at`,
    written in the same transaction as the rows)."""
    with psycopg.connect(live_pg_dsn) as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM computed_at - (bucket + interval '5 minutes')), "
            "extract(epoch FROM computed_at - source_computed_at) "
            "FROM energy.rollup_windows WHERE grain = %s AND bucket >= to_timestamp(%s) "
            "AND minutes_covered = minutes_expected",
            (HOUSEHOLD_5M, since),
        ).fetchall()
    return [{"close_to_row_s": float(c), "minute_to_row_s": float(m)} for c, m in rows]


def _drain_outbox(
    live_pg_dsn: str, receiver: live_alerts.Receiver, outage: tuple[float, float], say: Progress
) -> dict[str, Any]:
    """Give the retry sensor up to 3 minutes to deliver what waited out the outage, then sum up
    (the simulator and the daemon still run meanwhile)."""
    deadline = time.time() + 180
    state = live_alerts.outbox_state(live_pg_dsn)
    while state["pending"] and time.time() < deadline:
        time.sleep(5)
        state = live_alerts.outbox_state(live_pg_dsn)
    say(f"  outbox: {state}")
    retried = live_alerts.retried_keys(live_pg_dsn)
    return live_alerts.summarise(receiver, outage, state, retried)


def measure_live(
    targets: BenchTargets,
    live_pg_dsn: str,
    dagster_dsn: str,
    opts: BenchOptions,
    minutes: float,
    say: Progress,
    alerts: bool = False,
) -> dict[str, Any]:
    """Simulator writing live + the real Dagster daemon: freshness lag and per-run overhead.

    Uses its own InfluxDB and PostgreSQL databases, so the loaded history is not touched. Both
    `live_pg_dsn` and `dagster_dsn` must be dedicated to the bench: their contents are dropped.
    With `alerts`, 100 rules notify a webhook receiver that goes down for a minute halfway
    (live_alerts.py): minute close → webhook received, retries, duplicates.
    """
    live_db = f"{targets.influx_database}_live"
    influx = targets.influx(live_db)
    # A clean slate: points left by an earlier run, or a sensor cursor kept in Dagster's storage,
    # would have the daemon catching up old minutes instead of following the live ones.
    influx.query_json(f"DROP DATABASE {quote_ident(live_db)}")
    influx.create_database()
    with psycopg.connect(dagster_dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS public CASCADE")
        conn.execute("CREATE SCHEMA public")
    settings = Settings.from_env({"INFLUXDB_DATABASE": live_db, "ENERGY_PG_DSN": live_pg_dsn})
    settings = dataclasses_replace(settings, influx_url=targets.influx_url)
    with connect(live_pg_dsn) as conn:
        prepare_postgres(live_pg_dsn, conn, build_fleet(opts.devices, seed=opts.seed))
        # Alert state too: episodes, watermarks and outbox rows of an earlier run would have the
        # checks wait for (and finally skip) the minutes between the two runs.
        with conn.transaction():
            tables = [r[0] for r in conn.execute(
                "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables "
                "WHERE schemaname = 'energy' AND tablename LIKE 'alert%%' "
                "AND tablename <> 'alert_rules'")]  # fmt: skip
            conn.execute(f"TRUNCATE {', '.join(tables)} CASCADE")
    home = dagster_home(Path(tempfile.mkdtemp(prefix="bench-dagster-")))
    extra = {
        "INFLUXDB_URL": targets.influx_url,
        "INFLUXDB_DATABASE": live_db,
        "ENERGY_PG_DSN": live_pg_dsn,
    }
    receiver = live_alerts.Receiver()
    if alerts:
        say(f"  {live_alerts.apply_bench_rules(live_pg_dsn)} alert rules applied")
        receiver.start()
        extra |= {"ALERT_WEBHOOK_URL": receiver.url,
                  "ALERT_WEBHOOK_SECRET": live_alerts.WEBHOOK_SECRET}  # fmt: skip
    env = dagster_env(home, dagster_dsn, extra)
    stop = threading.Event()
    writer = threading.Thread(
        target=run_live,
        args=(influx, settings, SimulationOptions(opts.devices, opts.seed, register=False)),
        kwargs={"stop": stop},
    )
    began = time.time()
    writer.start()
    daemon = start_daemon(env, home / "daemon.log")
    lags: list[float] = []
    alert_figures: dict[str, Any] = {}
    full = opts.devices * 60 * 0.99
    # The receiver is down for a minute from the middle of the run (alerts only).
    outage = (began + minutes * 30, began + minutes * 30 + 60)
    try:
        warmup = began + 120  # the first minute is partial; the first run imports everything
        while time.time() < began + minutes * 60:
            time.sleep(5)
            if alerts and outage[0] <= time.time() < outage[1] and receiver.running:
                say("  webhook receiver down for 60 s")
                receiver.stop()
            elif alerts and time.time() >= outage[1] and not receiver.running:
                receiver.start()
                say("  webhook receiver back")
            with psycopg.connect(live_pg_dsn) as conn:
                row = conn.execute(
                    "SELECT max(bucket) FROM energy.rollup_minutes WHERE points_read >= %s",
                    (full,),
                ).fetchone()
            newest = row[0] if row else None
            if newest is not None and time.time() >= warmup:
                lags.append(time.time() - (newest.timestamp() + 60))
            elapsed = (time.time() - began) / 60
            if int(elapsed * 12) % 12 == 0:
                say(f"  live {elapsed:.1f}/{minutes} min, freshness lag now "
                    f"{lags[-1] if lags else float('nan'):.1f} s")  # fmt: skip
        if alerts:
            alert_figures = _drain_outbox(live_pg_dsn, receiver, outage, say)
    finally:
        stop.set()
        receiver.stop()
        # SIGINT lets the daemon stop its threads and code server; what is left of its session
        # (run workers) is killed after the timeout.
        stop_process(daemon, timeout_s=60)
        writer.join(timeout=30)
    runs = _dagster_run_timings(dagster_dsn, began + 120)
    windows = _household_window_timings(live_pg_dsn, began + 120)

    def stat(key: str, q: float) -> float:
        return pct([r[key] for r in runs], q)

    def window_stat(key: str, q: float) -> float:
        return pct([w[key] for w in windows], q)

    if alerts:
        spent = live_alerts.evaluation_seconds(dagster_dsn, began + 120)
        alert_figures |= {
            "alert_rule_evaluations": len(spent),
            "alert_rule_evaluation_p50_s": pct(spent, 0.5),
            "alert_rule_evaluation_p95_s": pct(spent, 0.95),
        }
    return {
        **({f"alerts_{k}": v for k, v in alert_figures.items()} if alerts else {}),
        "minutes": minutes,
        "freshness_samples": len(lags),
        "freshness_lag_p50_s": pct(lags, 0.5),
        "freshness_lag_p95_s": pct(lags, 0.95),
        "freshness_lag_max_s": max(lags) if lags else float("nan"),
        "sensor_runs": len(runs),
        "close_to_success_p50_s": stat("close_to_success_s", 0.5),
        "close_to_success_p95_s": stat("close_to_success_s", 0.95),
        # Had every minute been rolled up as fast as the fastest run, "now - end of the newest
        # complete minute" would still climb for 60 s before the next one lands: its p95 can be no
        # lower than this.
        "freshness_lag_p95_floor_s": stat("close_to_success_s", 0.0) + 0.95 * 60,
        "wait_for_sensor_p50_s": stat("wait_for_sensor_s", 0.5),
        "launch_p50_s": stat("launch_s", 0.5),
        "run_p50_s": stat("run_s", 0.5),
        "household_5m_windows": len(windows),
        "window_close_to_household_row_p50_s": window_stat("close_to_row_s", 0.5),
        "window_close_to_household_row_p95_s": window_stat("close_to_row_s", 0.95),
        "last_minute_rollup_to_household_row_p95_s": window_stat("minute_to_row_s", 0.95),
    }
