"""The coarse BI views look up each row's window in the ledger instead of joining the ledger.

`bi_household_5m` and `bi_device_hour` (0005) took `minutes_covered` and `minutes_expected` from
a LEFT JOIN of `rollup_windows`. A filter on the rollup's `bucket` does not reach the ledger's
side of an outer join, so the planner either hashed every ledger row of the grain (one a window,
for every day kept) or probed the ledger once per row at a cost that tipped a household's day into
a parallel plan: 6.7-8.9 ms against 0.65 ms for the same plan run serially (288 rows, 300 days
of windows in the ledger, two workers started for a sub-millisecond query).

Each column is now a scalar subquery on the ledger's primary key (grain, bucket): one index probe
a row when a query asks for it, nothing when it does not (PostgreSQL drops unused subquery
outputs of a view), and a plan that stays serial for small reads. Same columns, names and types,
so the views are replaced in place and keep their grants.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-29
"""

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def _household_5m(covered: str, expected: str, ledger_join: str) -> str:
    return f"""
CREATE OR REPLACE VIEW energy.bi_household_5m AS
SELECT r.bucket,
       r.household_id,
       h.timezone,
       h.devices_registered,
       r.device_count,
       r.sample_count,
       r.energy_wh_sum,
       r.power_w_avg,
       r.power_w_peak,
       {covered} AS minutes_covered,
       {expected} AS minutes_expected,
       r.computed_at
FROM energy.household_rollup_5m r
LEFT JOIN energy.bi_households h ON h.household_id = r.household_id{ledger_join};"""


def _device_hour(covered: str, expected: str, ledger_join: str) -> str:
    return f"""
CREATE OR REPLACE VIEW energy.bi_device_hour AS
SELECT r.bucket,
       r.device_id,
       r.household_id,
       d.name AS device_name,
       d.model AS device_model,
       d.location AS device_location,
       d.profile AS device_profile,
       d.timezone,
       r.sample_count,
       r.power_w_avg,
       r.power_w_min,
       r.power_w_max,
       r.energy_wh_sum,
       r.rejected_count,
       {covered} AS minutes_covered,
       {expected} AS minutes_expected,
       r.computed_at
FROM energy.device_rollup_1h r
LEFT JOIN energy.devices d ON d.device_id = r.device_id{ledger_join};"""


def _lookup(grain: str, column: str) -> str:
    return (
        f"(SELECT w.{column} FROM energy.rollup_windows w "
        f"WHERE w.grain = '{grain}' AND w.bucket = r.bucket)"
    )


def _join(grain: str) -> str:
    return (
        "\nLEFT JOIN energy.rollup_windows w"
        f"\n       ON w.grain = '{grain}' AND w.bucket = r.bucket"
    )


def _views(lookup: bool) -> str:
    parts = []
    for build, grain in (
        (_household_5m, "household_rollup_5m"),
        (_device_hour, "device_rollup_1h"),
    ):
        if lookup:
            parts.append(
                build(_lookup(grain, "minutes_covered"), _lookup(grain, "minutes_expected"), "")
            )
        else:
            parts.append(build("w.minutes_covered", "w.minutes_expected", _join(grain)))
    return "SET LOCAL ROLE energy_owner;" + "".join(parts) + "\nRESET ROLE;"


def upgrade() -> None:
    op.execute(_views(lookup=True))


def downgrade() -> None:
    op.execute(_views(lookup=False))
