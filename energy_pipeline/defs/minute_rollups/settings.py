"""How the minute rollup paces itself (sensors) and how each run works (per-run knobs)."""

import dagster as dg

from energy_pipeline.config import RUN_TIMEOUT_SECONDS


class MinuteSensorSettings(dg.ConfigurableResource):
    """When the minute sensors request runs: settling, lateness, catch-up size, run timeout."""

    settle_seconds: int = 5
    lateness_seconds: int = 7200
    late_audit_extra_seconds: int = 3600
    late_recent_seconds: int = 900
    late_full_scan_seconds: int = 2700
    max_range_minutes: int = 60
    raw_retention_days: int = 30
    run_timeout_seconds: int = RUN_TIMEOUT_SECONDS


class MinuteRunSettings(dg.ConfigurableResource):
    """How one minute-rollup run works through its window."""

    # Minutes read and written per transaction: bounds a catch-up run's memory.
    chunk_minutes: int = 5
