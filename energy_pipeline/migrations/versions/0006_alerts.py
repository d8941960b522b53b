"""Alerts: rules, episodes, the pending streaks of `for N windows`, silences, the outbox of
notifications and the watermark of evaluated windows per grain.

Episodes change and outbox rows are written in one transaction by `energy_pipeline.alerts`; the
delivery side reads `alert_outbox` (index on `next_attempt_at` for the rows still to send).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = ("alerts",)
depends_on = None

UPGRADE = r"""
SET LOCAL ROLE energy_owner;

CREATE TABLE energy.alert_rules (
    rule_id       text PRIMARY KEY CHECK (rule_id <> ''),
    name          text NOT NULL,
    description   text,
    kind          text NOT NULL CHECK (kind IN ('threshold', 'anomaly', 'quality')),
    scope         text NOT NULL CHECK (scope IN ('device', 'household', 'fleet')),
    entity_ids    text[],            -- NULL: every entity of the scope
    metric        text NOT NULL,
    window_size   text NOT NULL CHECK (window_size IN ('1m', '5m')),
    operator      text NOT NULL CHECK (operator IN ('>', '>=', '<', '<=', '==', '!=', '|z|>=')),
    threshold     double precision NOT NULL,   -- for anomalies: k of |z| >= k
    for_windows   integer NOT NULL DEFAULT 1 CHECK (for_windows >= 1),
    cooldown_s    integer CHECK (cooldown_s > 0),    -- NULL: no repeat while firing
    severity      text NOT NULL CHECK (severity IN ('info', 'warning', 'critical')),
    runbook_url   text,
    channels      text[] NOT NULL,
    baseline      jsonb,             -- anomaly: days, min_history, floor_w, floor_ratio
    enabled       boolean NOT NULL DEFAULT true,
    spec          jsonb NOT NULL,    -- the rule as written in its file, for `alerts list`
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- One row per episode: a rule firing for one entity from `started_at` (the first window of the
-- streak that opened it) until `resolved_at` (the first window where the condition was clear).
CREATE TABLE energy.alerts (
    alert_id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rule_id              text NOT NULL REFERENCES energy.alert_rules (rule_id),
    entity_type          text NOT NULL,
    entity               text NOT NULL,
    grain                text NOT NULL CHECK (grain IN ('1m', '5m')),
    state                text NOT NULL CHECK (state IN ('firing', 'resolved')),
    started_at           timestamptz NOT NULL,
    first_value          double precision,
    last_value           double precision,
    last_bucket          timestamptz NOT NULL,
    resolved_at          timestamptz,
    last_notified_at     timestamptz NOT NULL,   -- window time of the last firing/repeat
    repeats              integer NOT NULL DEFAULT 0,
    UNIQUE (rule_id, entity, started_at),
    CHECK ((state = 'resolved') = (resolved_at IS NOT NULL))
);
-- At most one open episode per rule and entity.
CREATE UNIQUE INDEX alerts_open_idx ON energy.alerts (rule_id, entity) WHERE state = 'firing';
CREATE INDEX alerts_started_idx ON energy.alerts (started_at);

-- Conditions true in consecutive windows that have not yet reached the rule's `for_windows`.
CREATE TABLE energy.alert_pending (
    rule_id      text NOT NULL REFERENCES energy.alert_rules (rule_id) ON DELETE CASCADE,
    entity       text NOT NULL,
    first_bucket timestamptz NOT NULL,
    last_bucket  timestamptz NOT NULL,
    windows      integer NOT NULL CHECK (windows >= 1),
    PRIMARY KEY (rule_id, entity)
);

-- The newest window applied to the episodes, per grain: windows are applied in order, once.
CREATE TABLE energy.alert_evaluations (
    grain        text PRIMARY KEY CHECK (grain IN ('1m', '5m')),
    last_bucket  timestamptz NOT NULL,
    evaluated_at timestamptz NOT NULL
);

-- Anomaly baselines per UTC hour, computed by the first evaluation of the hour and read by the
-- others (the previous days' hourly rows do not change within the hour).
CREATE TABLE energy.alert_baseline_hours (
    hour        timestamptz NOT NULL,
    scope       text NOT NULL,
    days        integer NOT NULL,
    entities    integer NOT NULL,
    computed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (hour, scope, days)
);
CREATE TABLE energy.alert_baselines (
    hour    timestamptz NOT NULL,
    scope   text NOT NULL,
    days    integer NOT NULL,
    entity  text NOT NULL,
    mean    double precision,
    std     double precision,
    n       integer NOT NULL,
    PRIMARY KEY (hour, scope, days, entity)
);

CREATE TABLE energy.alert_silences (
    silence_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rule_id     text,
    entity      text,
    until       timestamptz NOT NULL,
    reason      text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (rule_id IS NOT NULL OR entity IS NOT NULL)
);
CREATE INDEX alert_silences_until_idx ON energy.alert_silences (until);

CREATE TABLE energy.alert_outbox (
    outbox_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    idempotency_key  text NOT NULL UNIQUE,
    alert_id         bigint NOT NULL REFERENCES energy.alerts (alert_id),
    rule_id          text NOT NULL,
    entity           text NOT NULL,
    channel          text NOT NULL CHECK (channel IN ('webhook', 'slack', 'email', 'log')),
    kind             text NOT NULL CHECK (kind IN ('firing', 'repeat', 'resolved')),
    payload          jsonb NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    last_error       text,
    dead_lettered_at timestamptz,
    suppressed       text
);
CREATE INDEX alert_outbox_due_idx ON energy.alert_outbox (next_attempt_at)
    WHERE delivered_at IS NULL AND dead_lettered_at IS NULL AND suppressed IS NULL;
CREATE INDEX alert_outbox_alert_idx ON energy.alert_outbox (alert_id);

GRANT SELECT ON energy.alert_rules, energy.alerts, energy.alert_outbox, energy.alert_silences
    TO bi_reader;
REVOKE SELECT ON energy.alert_pending, energy.alert_evaluations, energy.alert_baselines,
    energy.alert_baseline_hours FROM bi_reader;

RESET ROLE;
"""

DOWNGRADE = """
DROP TABLE IF EXISTS energy.alert_outbox;
DROP TABLE IF EXISTS energy.alert_silences;
DROP TABLE IF EXISTS energy.alert_baselines;
DROP TABLE IF EXISTS energy.alert_baseline_hours;
DROP TABLE IF EXISTS energy.alert_evaluations;
DROP TABLE IF EXISTS energy.alert_pending;
DROP TABLE IF EXISTS energy.alerts;
DROP TABLE IF EXISTS energy.alert_rules;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
