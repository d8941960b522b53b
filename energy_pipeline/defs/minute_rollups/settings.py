"""How the minute rollup paces itself (sensors) and how each run works (per-run knobs).

Values come from `config.Settings` (environment variables, with their defaults there).
"""

import dagster as dg


class MinuteSensorSettings(dg.ConfigurableResource):
    """When the minute sensors request runs: settling, lateness, catch-up size, run timeout."""

    settle_seconds: int
    lateness_seconds: int
    late_audit_extra_seconds: int
    late_recent_seconds: int
    late_full_scan_seconds: int
    max_range_minutes: int
    raw_retention_days: int
    run_timeout_seconds: int


class MinuteRunSettings(dg.ConfigurableResource):
    """How one minute-rollup run works through its window."""

    # Minutes read and written per transaction: bounds a catch-up run's memory.
    chunk_minutes: int
