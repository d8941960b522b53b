"""Alerts in the live bench: 100 rules, a webhook receiver with an outage, end-to-end latency.

The rules cover every device: 50 thresholds no simulated device reaches (evaluated, never true),
10 thresholds on peak draw that EV chargers cross while charging, 35 anomaly rules and five
quality rules (silent devices, rejected ratio, fleet reporting, pipeline lag). Every rule notifies
the webhook channel, whose receiver runs in this process: it records when each notification
arrived, and goes down for a while in the middle of the run so the retry path is measured too.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import yaml

from energy_pipeline.alerts.channels import IDEMPOTENCY_HEADER
from energy_pipeline.alerts.rules import apply_rules, parse_rules
from energy_pipeline.devtools.bench.common import pct
from energy_pipeline.storage import connect

WEBHOOK_SECRET = "bench-webhook-secret"
# Ordinary device ids of the simulated fleet (index 101, 1203, ...; hostile ids sit elsewhere).
HEARTBEAT_DEVICES = ("dev-000101", "dev-001203", "dev-002305", "dev-003407", "dev-004509")


def bench_rules() -> list[dict[str, Any]]:
    """The 100 rules of the live bench, as a rule file's entries."""
    hook = {"channels": ["webhook"], "severity": "warning"}
    rules: list[dict[str, Any]] = []
    metrics = ("power_w_avg", "power_w_max", "energy_wh_sum")
    for i in range(45):
        metric = metrics[i % 3]
        limit = 1000.0 + i if metric == "energy_wh_sum" else 20_000.0 + 100 * i
        rules.append({"id": f"never-{i:02d}", "kind": "threshold", "metric": metric,
                      "operator": ">", "threshold": limit, **hook})  # fmt: skip
    # Always true (a draw is never negative) and repeated every minute: every minute of the run
    # yields latency samples whatever the simulated local time (EV chargers, which the ev-peak
    # rules watch, run only in local evenings and nights).
    for i, device in enumerate(HEARTBEAT_DEVICES):
        rules.append({"id": f"heartbeat-{i}", "kind": "threshold", "entities": [device],
                      "metric": "power_w_avg", "operator": ">=", "threshold": 0.0,
                      "cooldown": "1m", **hook})  # fmt: skip
    for i in range(10):
        rules.append({"id": f"ev-peak-{i:02d}", "kind": "threshold", "metric": "power_w_max",
                      "operator": ">", "threshold": 10_000.0 + 100 * i, "cooldown": "5m",
                      **hook})  # fmt: skip
    for i in range(35):
        rules.append({"id": f"anomaly-{i:02d}", "kind": "anomaly", "metric": "power_w_avg",
                      "k": 3 + 0.1 * i, **hook})  # fmt: skip
    rules += [
        {"id": "silent-3m", "kind": "quality", "check": "silent", "minutes": 3, **hook},
        {"id": "rejected-5pct", "kind": "quality", "check": "rejected_ratio",
         "above_percent": 5, **hook},
        {"id": "reporting-90pct", "kind": "quality", "check": "reporting",
         "below_percent": 90, **hook},
        {"id": "lag-30s", "kind": "quality", "check": "pipeline_lag", "above_seconds": 30, **hook},
        {"id": "silent-10m", "kind": "quality", "check": "silent", "minutes": 10, **hook},
    ]  # fmt: skip
    return rules


def apply_bench_rules(dsn: str) -> int:
    """Apply the bench's rules (through the same parser as `alerts apply`); how many."""
    rules = parse_rules(yaml.safe_dump({"rules": bench_rules()}))
    with connect(dsn) as conn:
        apply_rules(conn, rules)
    return len(rules)


@dataclass
class Receiver:
    """A webhook endpoint on loopback that records (arrival time, idempotency key, payload)."""

    port: int = 0
    received: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with outer._lock:
                    outer.received.append(
                        (time.time(), self.headers.get(IDEMPOTENCY_HEADER, ""), json.loads(body))
                    )
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        # HTTPServer sets SO_REUSEADDR: the restarted receiver gets the same port back.
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/alerts"


def retried_keys(dsn: str) -> set[str]:
    """Idempotency keys of webhook notifications that needed more than one attempt."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT idempotency_key FROM energy.alert_outbox "
            "WHERE channel = 'webhook' AND attempts > 1"
        ).fetchall()
    return {key for (key,) in rows}


def outbox_state(dsn: str) -> dict[str, int]:
    """Counts of the outbox rows by state, and the attempts that failed."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*), count(delivered_at), count(dead_lettered_at), "
            "count(*) FILTER (WHERE delivered_at IS NULL AND dead_lettered_at IS NULL "
            "AND suppressed IS NULL), "
            "coalesce(sum(attempts - (delivered_at IS NOT NULL)::int), 0) "
            "FROM energy.alert_outbox WHERE channel = 'webhook'"
        ).fetchone()
    assert row is not None
    keys = ("rows", "delivered", "dead_lettered", "pending", "failed_attempts")
    return dict(zip(keys, map(int, row), strict=True))


def summarise(
    receiver: Receiver, outage: tuple[float, float], outbox: dict[str, int], retried: set[str]
) -> dict[str, Any]:
    """Latency from window close to arrival, for notifications delivered at their first attempt
    (and, apart, for the `retried` ones, which waited out the outage); duplicates by key."""
    first: dict[str, tuple[float, dict[str, Any]]] = {}
    duplicates = 0
    for at, key, payload in sorted(receiver.received, key=lambda r: r[0]):
        if key in first:
            duplicates += 1
        else:
            first[key] = (at, payload)
    up: list[float] = []
    after_outage: list[float] = []
    kinds: dict[str, int] = {}
    for key, (at, payload) in first.items():
        kinds[payload.get("kind", "?")] = kinds.get(payload.get("kind", "?"), 0) + 1
        if payload.get("kind") not in ("firing", "repeat"):
            continue
        closed = datetime.fromisoformat(payload["window_end"]).timestamp()
        (after_outage if key in retried else up).append(at - closed)
    return {
        "notifications_received": len(first),
        "by_kind": kinds,
        "duplicates_received": duplicates,
        "close_to_webhook_samples": len(up),
        "close_to_webhook_p50_s": pct(up, 0.5),
        "close_to_webhook_p95_s": pct(up, 0.95),
        "close_to_webhook_max_s": max(up) if up else float("nan"),
        "receiver_outage_s": outage[1] - outage[0],
        "delivered_after_outage": len(after_outage),
        "after_outage_close_to_webhook_max_s": max(after_outage) if after_outage else float("nan"),
        "outbox_rows": outbox["rows"],
        "outbox_delivered": outbox["delivered"],
        "outbox_pending_at_end": outbox["pending"],
        "outbox_dead_lettered": outbox["dead_lettered"],
        "delivery_retries": outbox["failed_attempts"],
    }


def evaluation_seconds(dagster_dsn: str, since: float) -> list[float]:
    """`run_seconds_evaluating` of every alert_rules_1m check evaluation since `since`."""
    with psycopg.connect(dagster_dsn) as conn:
        rows = conn.execute(
            "SELECT event FROM event_logs WHERE dagster_event_type = 'ASSET_CHECK_EVALUATION' "
            "AND timestamp >= to_timestamp(%s) AT TIME ZONE 'UTC'",
            (since,),
        ).fetchall()
    out = []
    for (event,) in rows:
        data = json.loads(event)
        body = data.get("dagster_event", {}).get("event_specific_data", {})
        evaluation = body.get("asset_check_evaluation", body)
        if evaluation.get("check_name") != "alert_rules_1m":
            continue
        meta = evaluation.get("metadata", {}).get("run_seconds_evaluating", {})
        value = meta.get("value") if isinstance(meta, dict) else None
        if isinstance(value, int | float):
            out.append(float(value))
    return out
