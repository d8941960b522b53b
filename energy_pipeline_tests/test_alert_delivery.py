"""Delivering the alert outbox against the real PostgreSQL and real receivers on loopback:
retries with backoff through a receiver outage, dead letters, a crash between send and record,
concurrent deliverers, suppressed rows, and the retry sensor."""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import dagster as dg
import psycopg
import pytest
from psycopg.types.json import Jsonb

from energy_pipeline.alerts.channels import (
    Channels,
    WebhookChannel,
)
from energy_pipeline.alerts.delivery import Backoff, deliver_pending, requeue_dead_letters
from energy_pipeline.defs.alerts.resources import AlertChannelsResource
from energy_pipeline.defs.alerts.sensors import alert_delivery_sensor
from energy_pipeline.resources import PostgresResource
from energy_pipeline.storage import connect
from energy_pipeline_tests.receivers import HttpReceiver

SECRET = "whsec-delivery-tests"
NOW = datetime(2026, 11, 28, 3, 0, tzinfo=UTC)


@pytest.fixture
def conn(pg_dsn: str) -> Iterator[psycopg.Connection]:
    with connect(pg_dsn) as connection:
        yield connection


@pytest.fixture
def receiver() -> Iterator[HttpReceiver]:
    server = HttpReceiver().start()
    yield server
    server.stop()


def webhook(receiver: HttpReceiver) -> Channels:
    return Channels(webhook=WebhookChannel(receiver.url, SECRET, timeout_s=2.0))


def _episode(conn: psycopg.Connection, n: int) -> int:
    """An alert episode for outbox rows to point at (the migration's foreign key)."""
    rule_id = f"rule-{n}"
    conn.execute(
        "INSERT INTO energy.alert_rules (rule_id, name, kind, scope, metric, window_size, "
        "operator, threshold, severity, channels, spec) VALUES (%s, %s, 'threshold', 'device', "
        "'power_w_avg', '1m', '>', 11000, 'critical', ARRAY['webhook'], '{}') "
        "ON CONFLICT DO NOTHING",
        (rule_id, f"Rule {n}"),
    )
    row = conn.execute(
        "INSERT INTO energy.alerts (rule_id, entity_type, entity, grain, state, started_at, "
        "last_bucket, last_notified_at) VALUES (%s, 'device', %s, '1m', 'firing', %s, %s, %s) "
        "RETURNING alert_id",
        (rule_id, f"dev-{n}", NOW, NOW, NOW),
    ).fetchone()
    assert row is not None
    return int(row[0])


def add_outbox(
    conn: psycopg.Connection,
    n: int,
    channel: str = "webhook",
    *,
    suppressed: str | None = None,
    due: datetime = NOW,
    first: int = 0,
) -> list[int]:
    """`n` outbox rows as the alert lifecycle writes them; their ids."""
    ids = []
    for i in range(first, first + n):
        alert_id = _episode(conn, i)
        payload = {
            "rule_id": f"rule-{i}",
            "rule_name": f"Rule {i}",
            "kind": "firing",
            "severity": "critical",
            "entity_type": "device",
            "entity": f"dev-{i}",
            "metric": "power_w_avg",
            "value": 11000.0 + i,
            "operator": ">",
            "threshold": 11000.0,
        }
        row = conn.execute(
            "INSERT INTO energy.alert_outbox (idempotency_key, alert_id, rule_id, entity, "
            "channel, kind, payload, next_attempt_at, suppressed) "
            "VALUES (%s, %s, %s, %s, %s, 'firing', %s, %s, %s) RETURNING outbox_id",
            (
                f"alert-{alert_id}:{channel}:firing",
                alert_id,
                f"rule-{i}",
                f"dev-{i}",
                channel,
                Jsonb(payload),
                due,
                suppressed,
            ),
        ).fetchone()
        assert row is not None
        ids.append(int(row[0]))
    return ids


def outbox(conn: psycopg.Connection) -> dict[int, dict]:
    cur = conn.execute(
        "SELECT outbox_id, idempotency_key, attempts, next_attempt_at, delivered_at, last_error, "
        "dead_lettered_at FROM energy.alert_outbox ORDER BY outbox_id"
    )
    names = [c.name for c in cur.description or []]
    return {row[0]: dict(zip(names, row, strict=True)) for row in cur.fetchall()}


# --- backoff (pure) ------------------------------------------------------------------------------


@pytest.mark.parametrize("failures", range(1, 12))
def test_backoff_stays_inside_its_documented_bounds(failures):
    backoff, rng = Backoff(base_s=15, cap_s=1800), random.Random(failures)
    ceiling = min(1800, 15 * 2 ** (failures - 1))
    delays = [backoff.delay_s(failures, rng) for _ in range(200)]
    assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert max(delays) - min(delays) > ceiling / 4  # jittered, not a fixed step


def test_backoff_honours_retry_after_up_to_the_cap():
    backoff, rng = Backoff(base_s=15, cap_s=1800), random.Random(0)
    assert backoff.delay_s(1, rng, retry_after_s=120) == 120
    assert backoff.delay_s(1, rng, retry_after_s=86400) == 1800
    assert 7.5 <= backoff.delay_s(1, rng, retry_after_s=1) <= 15


# --- deliver_pending ------------------------------------------------------------------------------


def test_due_rows_are_delivered_once_and_recorded(conn, receiver, caplog):
    ids = add_outbox(conn, 3) + add_outbox(conn, 1, "log", first=3)
    later = add_outbox(conn, 1, due=NOW + timedelta(minutes=5), first=4)

    with caplog.at_level(logging.INFO, logger="energy_pipeline.alerts"):
        stats = deliver_pending(conn, webhook(receiver), NOW)

    assert (stats.delivered, stats.retried, stats.dead_lettered) == (4, 0, 0)
    rows = outbox(conn)
    assert all(rows[i]["delivered_at"] is not None and rows[i]["attempts"] == 1 for i in ids)
    assert rows[later[0]]["delivered_at"] is None  # not due yet
    assert sorted(r.key for r in receiver.requests) == sorted(
        rows[i]["idempotency_key"] for i in ids[:3]
    )
    assert any("alert_notification" in r.getMessage() for r in caplog.records)  # the log row
    # Again: nothing is due, nothing is sent.
    assert deliver_pending(conn, webhook(receiver), NOW).attempted == 0
    assert len(receiver.requests) == 3


def test_receiver_killed_mid_stream_then_back_gets_every_notification_exactly_once(conn, receiver):
    ids = add_outbox(conn, 30)
    receiver.stop_after = 12  # answers 12 posts, then goes down in the middle of the pass
    rng = random.Random(7)

    first = deliver_pending(conn, webhook(receiver), NOW, rng=rng)
    receiver.wait_stopped()
    assert first.delivered == 12 and first.retried == 18 and first.dead_lettered == 0
    rows = outbox(conn)
    waiting = [i for i in ids if rows[i]["delivered_at"] is None]
    for i in waiting:
        assert rows[i]["attempts"] == 1
        assert "cannot reach the receiver" in rows[i]["last_error"]
        assert (
            NOW + timedelta(seconds=7.5)
            <= rows[i]["next_attempt_at"]
            <= NOW + timedelta(seconds=15)
        )
    # Before the backoff has passed nothing is retried; the receiver is still down afterwards.
    assert (
        deliver_pending(conn, webhook(receiver), NOW + timedelta(seconds=7), rng=rng).attempted == 0
    )
    t2 = NOW + timedelta(seconds=16)
    second = deliver_pending(conn, webhook(receiver), t2, rng=rng)
    assert (second.delivered, second.retried) == (0, 18)
    rows = outbox(conn)
    for i in waiting:
        assert rows[i]["attempts"] == 2
        assert (
            t2 + timedelta(seconds=15) <= rows[i]["next_attempt_at"] <= t2 + timedelta(seconds=30)
        )

    receiver.restart()
    third = deliver_pending(conn, webhook(receiver), t2 + timedelta(seconds=31), rng=rng)

    assert (third.delivered, third.retried) == (18, 0)
    rows = outbox(conn)
    assert all(rows[i]["delivered_at"] is not None for i in ids)
    assert all(rows[i]["attempts"] == 3 for i in waiting)
    keys = receiver.accepted_keys()
    assert len(keys) == 30 and receiver.duplicates() == {}
    assert len(receiver.requests) == 30  # deliveries counted: none sent twice
    assert set(keys) == {rows[i]["idempotency_key"] for i in ids}


def test_after_max_attempts_a_row_is_dead_lettered_and_logged(conn, receiver, caplog):
    (row_id,) = add_outbox(conn, 1)
    receiver.default_status = 503
    with caplog.at_level(logging.ERROR, logger="energy_pipeline.alerts"):
        for hour in range(4):
            deliver_pending(conn, webhook(receiver), NOW + timedelta(hours=hour), max_attempts=3)

    row = outbox(conn)[row_id]
    assert row["dead_lettered_at"] is not None and row["delivered_at"] is None
    assert row["attempts"] == 3 and "HTTP 503" in row["last_error"]
    assert "the last" in row["last_error"]
    assert len(receiver.requests) == 3  # the fourth pass found it dead-lettered
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert f"outbox_id={row_id}" in error.getMessage() and "dead-lettered" in error.getMessage()

    # Once the channel works again, dead letters can be sent again on purpose.
    receiver.default_status = 200
    assert requeue_dead_letters(conn, NOW + timedelta(hours=5)) == 1
    assert deliver_pending(conn, webhook(receiver), NOW + timedelta(hours=5)).delivered == 1
    assert outbox(conn)[row_id]["delivered_at"] is not None


def test_a_line_break_in_a_device_id_adds_no_dead_letter_log_line(conn, receiver, caplog):
    (row_id,) = add_outbox(conn, 1)
    forged = "dev-0\nERROR alert notification delivered: outbox_id=99"
    conn.execute(
        "UPDATE energy.alert_outbox SET entity = %s, idempotency_key = %s WHERE outbox_id = %s",
        (forged, "rule-0:dev-0%0AERROR:firing", row_id),
    )
    receiver.statuses.append(400)  # refused: dead-lettered at once
    with caplog.at_level(logging.ERROR, logger="energy_pipeline.alerts"):
        stats = deliver_pending(conn, webhook(receiver), NOW)
    assert stats.dead_lettered == 1, stats
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    message = error.getMessage()
    assert "\n" not in message and "\r" not in message
    assert repr(forged) in message  # shown escaped, not dropped


def test_refusals_dead_letter_at_once_and_rate_limits_wait(conn, receiver):
    refused, limited = add_outbox(conn, 2)
    receiver.statuses.extend([400, 429])
    receiver.headers = {"Retry-After": "120"}

    stats = deliver_pending(conn, webhook(receiver), NOW)

    assert (stats.dead_lettered, stats.retried) == (1, 1)
    rows = outbox(conn)
    assert (
        rows[refused]["dead_lettered_at"] is not None and "HTTP 400" in rows[refused]["last_error"]
    )
    assert rows[limited]["dead_lettered_at"] is None
    assert rows[limited]["next_attempt_at"] >= NOW + timedelta(seconds=120)


def test_unconfigured_channel_is_dead_lettered_with_the_reason(conn, receiver):
    slack_id, email_id = add_outbox(conn, 1, "slack") + add_outbox(conn, 1, "email", first=1)
    stats = deliver_pending(conn, webhook(receiver), NOW)
    assert stats.dead_lettered == 2
    rows = outbox(conn)
    assert "ALERT_SLACK_WEBHOOK_URL" in rows[slack_id]["last_error"]
    assert "ALERT_SMTP_HOST" in rows[email_id]["last_error"]
    assert rows[slack_id]["attempts"] == 1


def test_a_payload_that_is_not_an_object_is_dead_lettered_with_the_reason(conn, receiver):
    (row_id,) = add_outbox(conn, 1)
    conn.execute(
        'UPDATE energy.alert_outbox SET payload = \'["not", "an object"]\' WHERE outbox_id = %s',
        (row_id,),
    )
    assert deliver_pending(conn, webhook(receiver), NOW).dead_lettered == 1
    assert outbox(conn)[row_id]["last_error"] == "payload is a JSON list, not an object"
    assert receiver.requests == []


def test_suppressed_rows_are_never_sent(conn, receiver):
    quiet = add_outbox(conn, 2, suppressed="silenced until 2026-11-28T06:00Z")
    (loud,) = add_outbox(conn, 1, first=2)

    for minutes in (0, 60, 600):
        deliver_pending(conn, webhook(receiver), NOW + timedelta(minutes=minutes))

    assert len(receiver.requests) == 1
    rows = outbox(conn)
    assert rows[loud]["delivered_at"] is not None
    assert all(rows[i]["attempts"] == 0 and rows[i]["delivered_at"] is None for i in quiet)


def test_outbox_ids_limit_a_pass_to_those_rows(conn, receiver):
    mine = add_outbox(conn, 2)
    others = add_outbox(conn, 2, first=2)
    assert deliver_pending(conn, webhook(receiver), NOW, outbox_ids=mine).delivered == 2
    rows = outbox(conn)
    assert all(rows[i]["delivered_at"] is None for i in others)


def test_needs_an_autocommit_connection(pg_dsn, receiver):
    with psycopg.connect(pg_dsn) as plain, pytest.raises(ValueError, match="autocommit"):
        deliver_pending(plain, webhook(receiver), NOW)


CRASH_AFTER_SEND = textwrap.dedent(
    """
    import os, sys
    from datetime import datetime
    from energy_pipeline.alerts.channels import Channels, WebhookChannel
    from energy_pipeline.alerts.delivery import deliver_pending
    from energy_pipeline.storage import connect

    class CrashAfterSend(WebhookChannel):
        def send(self, notification, log=None):
            super().send(notification, log)
            os._exit(3)  # dies after the receiver has it, before the outbox records it

    dsn, url, now = sys.argv[1:]
    with connect(dsn) as conn:
        channels = Channels(webhook=CrashAfterSend(url, "s"))
        deliver_pending(conn, channels, datetime.fromisoformat(now))
    """
)


def test_crash_between_send_and_record_resends_with_the_same_key(pg_dsn, conn, receiver):
    (row_id,) = add_outbox(conn, 1)
    done = subprocess.run(
        [sys.executable, "-c", CRASH_AFTER_SEND, pg_dsn, receiver.url, NOW.isoformat()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3, done.stderr
    assert len(receiver.requests) == 1
    row = outbox(conn)[row_id]
    assert row["delivered_at"] is None and row["attempts"] == 0  # rolled back with the process

    assert deliver_pending(conn, webhook(receiver), NOW).delivered == 1

    first, second = receiver.requests
    assert first.key == second.key == outbox(conn)[row_id]["idempotency_key"]
    # At least once with a stable key: the receiver's dedupe sees one notification.
    assert receiver.duplicates() == {first.key: 2}
    assert len(receiver.accepted_keys()) == 1


def test_concurrent_deliverers_never_send_a_row_twice(pg_dsn, conn, receiver):
    ids = add_outbox(conn, 40)
    receiver.delay_s = 0.02  # sends overlap
    start = threading.Barrier(2)
    results = []

    def deliver() -> None:
        with connect(pg_dsn) as own:
            start.wait()
            results.append(deliver_pending(own, webhook(receiver), NOW))

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    # What matters: every row sent, none twice (however the two threads were scheduled).
    assert sum(s.delivered for s in results) == 40
    assert len(receiver.requests) == 40 and receiver.duplicates() == {}
    assert all(r["delivered_at"] is not None for r in outbox(conn).values())
    assert len(ids) == 40


def test_a_slow_channel_holds_only_the_row_it_sends(pg_dsn, conn, receiver):
    (slow,) = add_outbox(conn, 1)  # claimed first: oldest id
    fast = add_outbox(conn, 2, "log", first=1)
    receiver.delay_s = 60.0  # released below, once the other deliverer is done
    slow_stats = []

    def deliver_all() -> None:
        with connect(pg_dsn) as own:
            ids = [slow, *fast]
            patient = Channels(webhook=WebhookChannel(receiver.url, SECRET, timeout_s=90.0))
            slow_stats.append(deliver_pending(own, patient, NOW, outbox_ids=ids))

    worker = threading.Thread(target=deliver_all)
    worker.start()
    deadline = time.monotonic() + 5
    while not receiver.requests and time.monotonic() < deadline:
        time.sleep(0.01)

    other = deliver_pending(conn, webhook(receiver), NOW)
    still_sending = worker.is_alive()
    receiver.release.set()
    worker.join(30)

    # The log rows went out while the webhook row was still being sent, not after it.
    assert other.delivered == 2 and still_sending
    assert slow_stats[0].delivered == 1
    assert all(r["delivered_at"] is not None for r in outbox(conn).values())


# --- the retry sensor -----------------------------------------------------------------------------


def test_retry_sensor_delivers_due_rows_and_reports_counts(pg_dsn, conn, receiver, caplog):
    ids = add_outbox(conn, 3, due=datetime.now(UTC) - timedelta(seconds=30))
    add_outbox(conn, 1, due=datetime.now(UTC) + timedelta(hours=1), first=3)
    resources = {
        "postgres": PostgresResource(dsn=pg_dsn),
        "alert_channels": AlertChannelsResource(webhook_url=receiver.url, webhook_secret=SECRET),
    }
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(instance=instance, resources=resources)
        result = alert_delivery_sensor(context)
        assert isinstance(result, dg.SensorResult)
        assert not result.run_requests
        assert result.skip_reason is not None
        assert "3 delivered, 0 to retry, 0 dead-lettered" in result.skip_reason.skip_message
        assert json.loads(result.cursor or "") == {"dead_lettered": 0, "delivered": 3, "retried": 0}

        receiver.stop()
        add_outbox(conn, 1, due=datetime.now(UTC) - timedelta(seconds=1), first=4)
        (unset,) = add_outbox(conn, 1, "slack", due=datetime.now(UTC), first=5)
        context = dg.build_sensor_context(
            instance=instance, resources=resources, cursor=result.cursor
        )
        with caplog.at_level(logging.ERROR):
            again = alert_delivery_sensor(context)
        assert json.loads(again.cursor or "") == {"dead_lettered": 1, "delivered": 3, "retried": 1}
        assert again.skip_reason is not None
        assert "0 delivered, 1 to retry, 1 dead-lettered" in again.skip_reason.skip_message
        assert any(f"outbox_id={unset}" in r.getMessage() for r in caplog.records)

    rows = outbox(conn)
    assert all(rows[i]["delivered_at"] is not None for i in ids)
    assert len(receiver.requests) == 3
