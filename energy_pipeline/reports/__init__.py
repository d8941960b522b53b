"""Daily household reports, without Dagster: the computation in PostgreSQL (compute), when each
day is due or stale (planning), tariffs, what a page shows (pages), its HTML (render), writing
pages to disk (files) and the `report` and `tariffs` commands (cli). See docs/reports.md."""
