"""Episodes and their outbox in a real PostgreSQL: `for` and cooldown over a sequence of minutes,
deadman, re-runs and late recomputes that never notify twice, racing runs, catch-up ranges that
notify only open episodes, silences that suppress and record."""

from __future__ import annotations

import threading
import urllib.parse
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from energy_pipeline.alerts.evaluate import evaluate_window
from energy_pipeline.alerts.lifecycle import (
    CATCH_UP,
    CATCH_UP_OPENED,
    MAX_WAIT,
    Episode,
    Event,
    Outcome,
    add_silence,
    apply_windows,
    history,
    idempotency_key,
)
from energy_pipeline.alerts.rules import Rule, apply_rules, parse_rules
from energy_pipeline.storage import connect
from energy_pipeline_tests.test_alert_evaluate import a_minute, put_minute, register

HOUSEHOLDS = {"d1": "h1", "d2": "h1", "d3": "h2"}
HOT = (
    "rules:\n"
    "  - {id: hot, kind: threshold, metric: power_w_avg, operator: '>', threshold: 1000,"
    " for: 3, cooldown: 3m, severity: critical, channels: [webhook, log],"
    " runbook_url: 'https://example.org/hot'}\n"
)


def setup_rules(conn: psycopg.Connection, text: str) -> list[Rule]:
    rules = parse_rules(text)
    apply_rules(conn, rules)
    register(conn, HOUSEHOLDS)
    return rules


def run_minutes(
    conn: psycopg.Connection, rules: list[Rule], minutes: list[datetime], now: datetime
) -> Outcome:
    """Evaluate the minutes and apply them in one call (a ranged run when several)."""
    evaluations = [evaluate_window(conn, rules, "1m", m) for m in minutes]
    return apply_windows(conn, rules, evaluations, now)


def outbox(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute(
        "SELECT entity, kind, channel, suppressed, idempotency_key FROM energy.alert_outbox "
        "ORDER BY outbox_id"
    ).fetchall()


def episodes(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute(
        "SELECT rule_id, entity, state, started_at, resolved_at, first_value, last_value, "
        "repeats FROM energy.alerts ORDER BY alert_id"
    ).fetchall()


def test_for_and_cooldown_over_a_sequence_of_minutes(pg_dsn):
    start = a_minute(40)
    minutes = [start + timedelta(minutes=i) for i in range(10)]
    # d1 above 1000 W in minutes 1..7; d2 only in minutes 2..3 (never 3 in a row)
    draws = [(500, 0), (1100, 0), (1200, 1500), (1300, 1500), (1400, 0), (1500, 0),
             (1600, 0), (1700, 0), (900, 0), (800, 0)]  # fmt: skip
    now = datetime.now(UTC)
    with connect(pg_dsn) as conn:
        rules = setup_rules(conn, HOT)
        kinds_per_minute = []
        for minute, (d1, d2) in zip(minutes, draws, strict=True):
            put_minute(conn, minute, {"d1": float(d1), "d2": float(d2)}, HOUSEHOLDS)
            before = len(outbox(conn))
            outcome = run_minutes(conn, rules, [minute], now)
            assert len(outcome.outbox_ids) == len(outbox(conn)) - before
            kinds_per_minute.append(sorted({row[1] for row in outbox(conn)[before:]}))
        assert kinds_per_minute == [
            [],
            [],
            [],
            ["firing"],
            [],
            [],
            ["repeat"],
            [],
            ["resolved"],
            [],
        ]
        assert episodes(conn) == [
            ("hot", "d1", "resolved", minutes[1], minutes[8], 1300.0, 1700.0, 1)
        ]
        rows = outbox(conn)
        assert [(r[1], r[2]) for r in rows] == [
            ("firing", "log"), ("firing", "webhook"), ("repeat", "log"), ("repeat", "webhook"),
            ("resolved", "log"), ("resolved", "webhook"),
        ]  # fmt: skip
        assert rows[1][4] == f"hot:d1:{minutes[1].isoformat()}:firing:0:webhook"
        payload = conn.execute(
            "SELECT payload FROM energy.alert_outbox WHERE kind = 'firing' AND channel = 'log'"
        ).fetchone()[0]
        assert payload["value"] == 1300.0 and payload["threshold"] == 1000.0
        assert payload["window_start"] == minutes[3].isoformat()
        assert payload["started_at"] == minutes[1].isoformat()
        assert payload["runbook_url"] == "https://example.org/hot"
        assert payload["summary"].startswith("[CRITICAL] FIRING: hot — device d1")
        assert conn.execute("SELECT count(*) FROM energy.alert_pending").fetchone() == (0,)


def test_rerun_and_late_recompute_of_a_minute_add_no_outbox_row(pg_dsn):
    start = a_minute(30)
    minutes = [start + timedelta(minutes=i) for i in range(4)]
    now = datetime.now(UTC)
    with connect(pg_dsn) as conn:
        rules = setup_rules(conn, HOT)
        for m in minutes:
            put_minute(conn, m, {"d1": 2000.0}, HOUSEHOLDS)
            run_minutes(conn, rules, [m], now)
        before, states = outbox(conn), episodes(conn)
        assert [r[1] for r in before] == ["firing", "firing"]
        again = run_minutes(conn, rules, [minutes[-1]], now)  # the same minute re-run
        # late data recomputes an older minute: now clear, yet the episode has moved on
        put_minute(conn, minutes[1], {"d1": 10.0}, HOUSEHOLDS)
        late = run_minutes(conn, rules, [minutes[1]], now)
        assert again.skipped == [minutes[-1]] and late.skipped == [minutes[1]]
        assert again.outbox_ids == late.outbox_ids == []
        assert outbox(conn) == before and episodes(conn) == states


def test_racing_runs_of_one_minute_notify_once(pg_dsn):
    start = a_minute(30)
    rules_text = HOT.replace("for: 3", "for: 1")
    with connect(pg_dsn) as conn:
        rules = setup_rules(conn, rules_text)
        put_minute(conn, start, {"d1": 2000.0, "d2": 3000.0}, HOUSEHOLDS)
    outcomes: list[Outcome] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        with connect(pg_dsn) as conn:
            evaluation = evaluate_window(conn, rules, "1m", start)
            barrier.wait()
            outcomes.append(apply_windows(conn, rules, [evaluation], datetime.now(UTC)))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(len(o.outbox_ids) for o in outcomes) == [0, 0, 0, 4]
    with connect(pg_dsn) as conn:
        assert len(outbox(conn)) == 4 and len(episodes(conn)) == 2


def test_deadman_fires_after_n_silent_minutes_and_resolves_when_heard(pg_dsn):
    text = "rules:\n  - {id: silent, kind: quality, check: silent, minutes: 3, channels: [log]}\n"
    start = a_minute(30)
    now = datetime.now(UTC)
    with connect(pg_dsn) as conn:
        rules = setup_rules(conn, text)
        fired_at = []
        for i in range(6):
            minute = start + timedelta(minutes=i)
            heard = {"d1": 10.0, "d2": 10.0} | ({"d3": 5.0} if i == 5 else {})
            put_minute(conn, minute, heard, HOUSEHOLDS)
            outcome = run_minutes(conn, rules, [minute], now)
            fired_at += [(i, "firing")] * outcome.opened + [(i, "resolved")] * outcome.resolved
        assert fired_at == [(2, "firing"), (5, "resolved")]
        assert episodes(conn)[0][:5] == (
            "silent", "d3", "resolved", start, start + timedelta(minutes=5),
        )  # fmt: skip


def test_ranged_run_notifies_only_episodes_still_open_at_its_end(pg_dsn):
    rules_text = HOT.replace("for: 3", "for: 1")
    start = a_minute(50)
    minutes = [start + timedelta(minutes=i) for i in range(30)]
    with connect(pg_dsn) as conn:
        rules = setup_rules(conn, rules_text)
        for i, m in enumerate(minutes):
            # d1 flaps early in the range; d2 fires from minute 20 on and is still firing
            d1 = 2000.0 if i in (2, 3, 7) else 10.0
            d2 = 2000.0 if i >= 20 else 10.0
            put_minute(conn, m, {"d1": d1, "d2": d2}, HOUSEHOLDS)
        outcome = run_minutes(conn, rules, minutes, datetime.now(UTC))
        sent = conn.execute(
            "SELECT entity, kind, channel, payload->>'window_start' FROM energy.alert_outbox "
            "WHERE outbox_id = ANY(%s) ORDER BY outbox_id",
            (outcome.outbox_ids,),
        ).fetchall()
        suppressed = conn.execute(
            "SELECT entity, kind, suppressed FROM energy.alert_outbox WHERE suppressed IS NOT NULL"
        ).fetchall()
    assert outcome.applied == minutes and outcome.opened == 1
    # d2: one firing per channel; its repeats (cooldown 3 m: minutes 23, 26, 29) are held back
    assert [(e, k, c) for e, k, c, _ in sent] == [
        ("d2", "firing", "log"),
        ("d2", "firing", "webhook"),
    ]
    assert sent[0][3] == minutes[20].isoformat()
    # d1's two episodes (2-3 and 7) and d2's repeats are recorded, never sent
    d1 = [s for s in suppressed if s[0] == "d1"]
    assert len(d1) == 8 and {s[2] for s in d1} == {CATCH_UP}
    d2 = [s for s in suppressed if s[0] == "d2"]
    assert len(d2) == 6 and {(s[1], s[2]) for s in d2} == {("repeat", CATCH_UP_OPENED)}


def test_silence_suppresses_delivery_and_is_recorded(pg_dsn):
    rules_text = HOT.replace("for: 3", "for: 1")
    start = a_minute(30)
    now = datetime.now(UTC)
    with connect(pg_dsn) as conn:
        rules = setup_rules(conn, rules_text)
        add_silence(conn, now + timedelta(hours=1), entity="d1", reason="maintenance")
        add_silence(conn, now - timedelta(minutes=1), entity="d2")  # already over
        put_minute(conn, start, {"d1": 2000.0, "d2": 2000.0}, HOUSEHOLDS)
        outcome = run_minutes(conn, rules, [start], now)
        rows = {(r[0], r[2]): r[3] for r in outbox(conn)}
        assert rows[("d2", "webhook")] is None and rows[("d2", "log")] is None
        assert rows[("d1", "webhook")].startswith("silenced until ")
        assert rows[("d1", "webhook")].endswith(": maintenance")
        assert outcome.suppressed == 2 and len(outcome.outbox_ids) == 2
        past = history(conn, start - timedelta(hours=1))
        assert {(h["entity"], h["notifications"], h["suppressed"]) for h in past} == {
            ("d1", 0, 2),
            ("d2", 2, 0),
        }


def test_disabling_a_rule_closes_its_open_episodes_quietly(pg_dsn):
    rules_text = HOT.replace("for: 3", "for: 1")
    start = a_minute(30)
    with connect(pg_dsn) as conn:
        rules = setup_rules(conn, rules_text)
        put_minute(conn, start, {"d1": 2000.0}, HOUSEHOLDS)
        run_minutes(conn, rules, [start], datetime.now(UTC))
        result = apply_rules(conn, [])
        assert result.disabled == ["hot"]
        assert [e[2] for e in episodes(conn)] == ["resolved"]
        assert [r[1] for r in outbox(conn)] == ["firing", "firing"]


def test_a_failure_half_way_leaves_no_partial_state(pg_dsn):
    rules_text = HOT.replace("for: 3", "for: 1")
    start = a_minute(30)
    with connect(pg_dsn) as conn:
        rules = setup_rules(conn, rules_text)
        put_minute(conn, start, {"d1": 2000.0}, HOUSEHOLDS)
        # the outbox write fails after the episode rows were written in the same transaction
        conn.execute(
            "CREATE FUNCTION energy.refuse() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'outbox unavailable'; END $$"
        )
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON energy.alert_outbox "
            "FOR EACH ROW EXECUTE FUNCTION energy.refuse()"
        )
        evaluation = evaluate_window(conn, rules, "1m", start)
        with pytest.raises(psycopg.errors.RaiseException):
            apply_windows(conn, rules, [evaluation], datetime.now(UTC))
        for table in ("alerts", "alert_pending", "alert_outbox", "alert_evaluations"):
            assert conn.execute(f"SELECT count(*) FROM energy.{table}").fetchone() == (0,)
        conn.execute("DROP TRIGGER refuse ON energy.alert_outbox")
        outcome = apply_windows(conn, rules, [evaluation], datetime.now(UTC))
        assert outcome.opened == 1 and len(outbox(conn)) == 2  # the retry writes it all once


def test_a_crash_between_evaluation_and_delivery_notifies_once(pg_dsn, caplog):
    import logging

    from energy_pipeline.alerts.channels import Channels, LogChannel
    from energy_pipeline.alerts.delivery import deliver_pending

    rules_text = HOT.replace("for: 3", "for: 1").replace("[webhook, log]", "[log]")
    start = a_minute(30)
    channels = Channels(log=LogChannel(logging.getLogger("alerts-under-test")))
    with connect(pg_dsn) as conn:
        rules = setup_rules(conn, rules_text)
        put_minute(conn, start, {"d1": 2000.0}, HOUSEHOLDS)
        first = run_minutes(conn, rules, [start], datetime.now(UTC))
        # the run dies here, before its fast-path delivery; the retried run re-evaluates
        retried = run_minutes(conn, rules, [start], datetime.now(UTC))
        assert len(first.outbox_ids) == 1 and retried.outbox_ids == []
        with caplog.at_level(logging.INFO, logger="alerts-under-test"):
            swept = deliver_pending(conn, channels, datetime.now(UTC))  # the delivery sensor
            again = deliver_pending(conn, channels, datetime.now(UTC))
        assert (swept.delivered, again.delivered) == (1, 0)
        key = f"hot:d1:{start.isoformat()}:firing:0:log"
        assert sum(key in r.getMessage() for r in caplog.records) == 1
        assert outbox(conn)[0][4] == key


def test_a_range_that_resolves_and_reopens_an_episode_opened_before_it(pg_dsn):
    rules_text = HOT.replace("for: 3", "for: 1").replace("[webhook, log]", "[log]")
    start = a_minute(40)
    minutes = [start + timedelta(minutes=i) for i in range(5)]
    with connect(pg_dsn) as conn:
        rules = setup_rules(conn, rules_text)
        draws = zip(minutes, [2000.0, 2000.0, 10.0, 2000.0, 2000.0], strict=True)
        for i, (m, watts) in enumerate(draws):
            put_minute(conn, m, {"d1": watts}, HOUSEHOLDS)
            if i == 0:  # opened and notified before the later minutes are rolled up
                run_minutes(conn, rules, minutes[:1], datetime.now(UTC))
        outcome = run_minutes(conn, rules, minutes[1:], datetime.now(UTC))  # catch-up
        assert [(e[2], e[3], e[4]) for e in episodes(conn)] == [
            ("resolved", minutes[0], minutes[2]),
            ("firing", minutes[3], None),
        ]
        # the notified episode's resolution and the new open episode are sent
        assert (outcome.opened, outcome.resolved, outcome.suppressed) == (1, 1, 0)
        assert [r[1] for r in outbox(conn)] == ["firing", "resolved", "firing"]


def _state(conn: psycopg.Connection) -> tuple[list[tuple], list[tuple]]:
    return episodes(conn), outbox(conn)


def _wipe(conn: psycopg.Connection) -> None:
    conn.execute(
        "TRUNCATE energy.alerts, energy.alert_outbox, energy.alert_pending, "
        "energy.alert_evaluations, energy.rollup_minutes, energy.device_rollup_1m CASCADE"
    )
    conn.commit()


def test_windows_finished_out_of_order_give_the_episodes_and_outbox_of_in_order(pg_dsn):
    rules_text = HOT.replace("for: 3", "for: 2")
    start = a_minute(20)
    minutes = [start + timedelta(minutes=i) for i in range(5)]
    # d1: pending at 1, firing at 2, resolved at 3, pending again at 4
    draws = dict(zip(minutes, [500.0, 1500.0, 1500.0, 10.0, 1500.0], strict=True))
    now = minutes[-1] + timedelta(minutes=2)

    def finish(conn: psycopg.Connection, minute: datetime) -> Outcome:
        put_minute(conn, minute, {"d1": draws[minute]}, HOUSEHOLDS)
        return run_minutes(conn, rules, [minute], now)

    with connect(pg_dsn) as conn:
        rules = setup_rules(conn, rules_text)
        for minute in minutes:
            finish(conn, minute)
        in_order = _state(conn)
        _wipe(conn)
        finish(conn, minutes[0])
        # minute 2 finishes before minute 1: it waits, then minute 1's check applies both
        assert finish(conn, minutes[2]).waiting == [minutes[2]]
        assert finish(conn, minutes[1]).applied == [minutes[1], minutes[2]]
        assert finish(conn, minutes[4]).applied == []
        late = finish(conn, minutes[3])
        assert late.applied == [minutes[3], minutes[4]]
        assert late.given_up == []
        assert _state(conn) == in_order
    assert [r[1] for r in in_order[1]] == ["firing", "firing", "resolved", "resolved"]


def test_a_window_never_rolled_up_is_given_up_after_the_bound_and_reported(pg_dsn):
    rules_text = HOT.replace("for: 3", "for: 1").replace("[webhook, log]", "[log]")
    start = a_minute(20)
    m0, m1, m2, m3 = (start + timedelta(minutes=i) for i in range(4))
    with connect(pg_dsn) as conn:
        rules = setup_rules(conn, rules_text)
        put_minute(conn, m0, {"d1": 10.0}, HOUSEHOLDS)
        run_minutes(conn, rules, [m0], m0 + timedelta(minutes=2))
        put_minute(conn, m2, {"d1": 2000.0}, HOUSEHOLDS)  # minute 1 is never rolled up
        waiting = run_minutes(conn, rules, [m2], m2 + timedelta(minutes=2))
        assert (waiting.applied, waiting.waiting, waiting.given_up) == ([], [m2], [])
        assert outbox(conn) == []
        put_minute(conn, m3, {"d1": 2000.0}, HOUSEHOLDS)
        outcome = run_minutes(conn, rules, [m3], m2 + MAX_WAIT)
        assert outcome.given_up == [(m1, m1)]
        assert outcome.applied == [m2, m3]
        assert [(r[0], r[1]) for r in outbox(conn)] == [("d1", "firing")]
        assert episodes(conn)[0][3] == m2


def test_an_entity_without_a_row_in_a_window_keeps_its_episode_open(pg_dsn):
    rules_text = HOT.replace("for: 3", "for: 1").replace("[webhook, log]", "[log]")
    start = a_minute(30)
    minutes = [start + timedelta(minutes=i) for i in range(4)]
    now = datetime.now(UTC)
    with connect(pg_dsn) as conn:
        rules = setup_rules(conn, rules_text)
        # d1 hot, then silent for a minute (only d2 reports), hot again, then cool
        for minute, power in zip(
            minutes,
            [{"d1": 2000.0}, {"d2": 10.0}, {"d1": 2000.0, "d2": 10.0}, {"d1": 10.0}],
            strict=True,
        ):
            put_minute(conn, minute, power, HOUSEHOLDS)
            run_minutes(conn, rules, [minute], now)
        assert [(r[0], r[1]) for r in outbox(conn)] == [("d1", "firing"), ("d1", "resolved")]
        assert [(e[1], e[2], e[3], e[4]) for e in episodes(conn)] == [
            ("d1", "resolved", minutes[0], minutes[3])
        ]


@given(
    entity=st.text(min_size=1, max_size=30),
    started=st.datetimes(timezones=st.just(UTC)),
    kind=st.sampled_from(["firing", "repeat", "resolved"]),
    seq=st.integers(0, 1000),
)
def test_an_idempotency_key_gives_back_its_rule_and_entity(entity, started, kind, seq):
    episode = Episode("hot.rule-1", entity, "device", started, None, None, started, started)
    key = idempotency_key(episode, Event(episode, kind, seq, started, {}))
    rule, quoted, rest = key.split(":", 2)
    assert (rule, urllib.parse.unquote(quoted)) == ("hot.rule-1", entity)
    assert rest == f"{started.isoformat()}:{kind}:{seq}"
