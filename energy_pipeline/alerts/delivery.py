"""Delivering the alert outbox: claim a due row, send it, record how it went.

Delivery is at least once, with a stable idempotency key: a row is marked delivered in the same
transaction that holds its row lock during the send, so a crash between the send and the commit
leaves it undelivered, and it is sent again with the same key (and the same email Message-ID).
Receivers that drop keys they have seen turn this into exactly once.

Each row is claimed with `FOR UPDATE SKIP LOCKED` in a transaction of its own, so concurrent
callers (a run's fast path, the retry sensor) never send one row at the same time, and a slow
channel holds only the row it is sending. The connection must be in autocommit mode (as
`storage.connect` opens it); otherwise every row's transaction would be a savepoint of one long
transaction, and the locks and the results would stay until the caller commits.

No Dagster here: the fast path and `alert_delivery_sensor` call `deliver_pending`.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg

from energy_pipeline.alerts.channels import (
    Channels,
    Notification,
    PermanentError,
    TransientError,
    one_line,
)

LOGGER = logging.getLogger("energy_pipeline.alerts.delivery")
MAX_ATTEMPTS = 8
# A claimed row's transaction is idle while its channel sends. Channels time out well before
# this; should a process hang anyway, PostgreSQL ends its session and releases the row.
SEND_LOCK_TIMEOUT = "120s"

# Rows to try, oldest due first, read without locks; each is then claimed on its own. A claim
# by primary key costs the same however many rows a pass has already handled.
_DUE = """
SELECT outbox_id
FROM energy.alert_outbox
WHERE delivered_at IS NULL AND dead_lettered_at IS NULL AND suppressed IS NULL
  AND next_attempt_at <= %(now)s
  AND outbox_id <> ALL(%(tried)s)
  AND (%(ids)s::bigint[] IS NULL OR outbox_id = ANY(%(ids)s))
ORDER BY next_attempt_at, outbox_id
LIMIT %(batch)s
"""
# The same conditions again under the lock: another deliverer may have sent the row meanwhile.
_CLAIM = """
SELECT outbox_id, idempotency_key, channel, kind, rule_id, entity, payload, attempts
FROM energy.alert_outbox
WHERE outbox_id = %(id)s
  AND delivered_at IS NULL AND dead_lettered_at IS NULL AND suppressed IS NULL
  AND next_attempt_at <= %(now)s
FOR UPDATE SKIP LOCKED
"""
BATCH_ROWS = 500
_DELIVERED = """
UPDATE energy.alert_outbox
SET delivered_at = clock_timestamp(), attempts = attempts + 1
WHERE outbox_id = %s
"""
_RETRY = """
UPDATE energy.alert_outbox
SET attempts = attempts + 1, last_error = %s, next_attempt_at = %s
WHERE outbox_id = %s
"""
_DEAD_LETTER = """
UPDATE energy.alert_outbox
SET attempts = attempts + 1, last_error = %s, dead_lettered_at = clock_timestamp()
WHERE outbox_id = %s
"""


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with bounded jitter.

    Before retry n (after n failed attempts) the row waits a random time in [d/2, d], where
    d = min(cap_s, base_s * 2**(n-1)): 7.5–15 s, 15–30 s, 30–60 s, … up to 15–30 minutes. The
    jitter spreads the retries of many rows that failed together (a receiver outage) so they do
    not all arrive at once when it comes back. A receiver's `Retry-After` (408/429/5xx) is
    honoured as a lower bound, up to `cap_s`.
    """

    base_s: float = 15.0
    cap_s: float = 1800.0

    def delay_s(
        self, failures: int, rng: random.Random, retry_after_s: float | None = None
    ) -> float:
        ceiling = min(self.cap_s, self.base_s * 2 ** max(failures - 1, 0))
        delay = rng.uniform(ceiling / 2, ceiling)
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.cap_s))
        return delay


BACKOFF = Backoff()


@dataclass(frozen=True)
class DeadLetter:
    """A notification given up on, and why."""

    outbox_id: int
    channel: str
    idempotency_key: str
    attempts: int
    reason: str


@dataclass
class DeliveryStats:
    """What one `deliver_pending` call did."""

    delivered: int = 0
    retried: int = 0
    dead_letters: list[DeadLetter] = field(default_factory=list)

    @property
    def dead_lettered(self) -> int:
        return len(self.dead_letters)

    @property
    def attempted(self) -> int:
        return self.delivered + self.retried + self.dead_lettered

    def describe(self) -> str:
        return (
            f"{self.delivered} delivered, {self.retried} to retry, "
            f"{self.dead_lettered} dead-lettered"
        )


def deliver_pending(
    conn: psycopg.Connection,
    channels: Channels,
    now: datetime,
    *,
    outbox_ids: Sequence[int] | None = None,
    log: Any = None,
    max_attempts: int = MAX_ATTEMPTS,
    backoff: Backoff = BACKOFF,
    rng: random.Random | None = None,
    time_budget_s: float | None = None,
) -> DeliveryStats:
    """Send every due outbox row (or only `outbox_ids`) once, and record each outcome.

    A row is due when it is not delivered, not dead-lettered, not suppressed and its
    `next_attempt_at` is at or before `now`. Delivered rows get `delivered_at`; a failure that
    may pass gets `attempts + 1`, `last_error` and `next_attempt_at = now + backoff`; a refusal
    (4xx other than 408/429, an unknown or unconfigured channel, SMTP 5xx) or the
    `max_attempts`-th failure gets `dead_lettered_at`, logged as an error (to `log` as well, a
    Dagster logger for instance). `delivered_at` and `dead_lettered_at` are the database's clock;
    `now` decides what is due and where backoff counts from. Each row is tried at most once per
    call; with `time_budget_s`, no new row is claimed once that many seconds have passed.
    """
    if not conn.autocommit:
        raise ValueError("deliver_pending needs an autocommit connection (see storage.connect)")
    rng = rng or random.Random()
    stats = DeliveryStats()
    tried: list[int] = []
    ids = list(outbox_ids) if outbox_ids is not None else None
    started = time.monotonic()

    def in_budget() -> bool:
        return time_budget_s is None or time.monotonic() - started < time_budget_s

    while in_budget():
        params = {"now": now, "tried": tried, "ids": ids, "batch": BATCH_ROWS}
        batch = [r[0] for r in conn.execute(_DUE, params).fetchall()]
        if not batch:
            break
        for outbox_id in batch:
            if not in_budget():
                break
            tried.append(outbox_id)
            with conn.transaction():
                row = conn.execute(_CLAIM, {"id": outbox_id, "now": now}).fetchone()
                if row is None:
                    continue  # sent or being sent by another deliverer
                conn.execute(
                    f"SET LOCAL idle_in_transaction_session_timeout = '{SEND_LOCK_TIMEOUT}'"
                )
                note = Notification(*row)
                _send_and_record(conn, channels, note, now, log, max_attempts, backoff, rng, stats)
    return stats


def _send_and_record(
    conn: psycopg.Connection,
    channels: Channels,
    note: Notification,
    now: datetime,
    log: Any,
    max_attempts: int,
    backoff: Backoff,
    rng: random.Random,
    stats: DeliveryStats,
) -> None:
    failures = note.attempts + 1
    try:
        if not isinstance(note.payload, dict):
            raise PermanentError(f"payload is a JSON {type(note.payload).__name__}, not an object")
        channels.get(note.channel).send(note, log)
    except PermanentError as exc:
        _dead_letter(conn, note, failures, str(exc), log, stats)
    except Exception as exc:  # noqa: BLE001 - any other failure (a channel bug too) is retried
        reason = str(exc) if isinstance(exc, TransientError) else f"{type(exc).__name__}: {exc}"
        if failures >= max_attempts:
            _dead_letter(
                conn, note, failures, f"{reason} (attempt {failures}, the last)", log, stats
            )
            return
        retry_after = exc.retry_after_s if isinstance(exc, TransientError) else None
        delay = backoff.delay_s(failures, rng, retry_after)
        conn.execute(_RETRY, (reason, now + timedelta(seconds=delay), note.outbox_id))
        stats.retried += 1
        LOGGER.info(
            "alert outbox %s (%s) attempt %s failed, retry in %.0f s: %s",
            note.outbox_id,
            note.channel,
            failures,
            delay,
            reason,
        )
    else:
        conn.execute(_DELIVERED, (note.outbox_id,))
        stats.delivered += 1


def _dead_letter(
    conn: psycopg.Connection,
    note: Notification,
    attempts: int,
    reason: str,
    log: Any,
    stats: DeliveryStats,
) -> None:
    conn.execute(_DEAD_LETTER, (reason, note.outbox_id))
    letter = DeadLetter(note.outbox_id, note.channel, note.idempotency_key, attempts, reason)
    stats.dead_letters.append(letter)
    # Ids are free text: quoted and escaped (repr), so a line break cannot forge a log line.
    message = (
        f"alert notification dead-lettered: outbox_id={note.outbox_id} channel={note.channel} "
        f"rule={note.rule_id!r} entity={note.entity!r} kind={note.kind} "
        f"key={note.idempotency_key!r} attempts={attempts}: {one_line(reason)}"
    )
    LOGGER.error(message)
    if log is not None:
        log.error(message)


def requeue_dead_letters(
    conn: psycopg.Connection,
    now: datetime,
    *,
    outbox_ids: Sequence[int] | None = None,
    channel: str | None = None,
) -> int:
    """Make dead letters due again with a fresh attempt count (after fixing a channel's
    settings, say); returns how many. `last_error` keeps the reason they died."""
    cur = conn.execute(
        """
        UPDATE energy.alert_outbox
        SET dead_lettered_at = NULL, attempts = 0, next_attempt_at = %(now)s
        WHERE dead_lettered_at IS NOT NULL AND delivered_at IS NULL AND suppressed IS NULL
          AND (%(ids)s::bigint[] IS NULL OR outbox_id = ANY(%(ids)s))
          AND (%(channel)s::text IS NULL OR channel = %(channel)s)
        """,
        {
            "now": now,
            "ids": list(outbox_ids) if outbox_ids is not None else None,
            "channel": channel,
        },
    )
    return cur.rowcount
