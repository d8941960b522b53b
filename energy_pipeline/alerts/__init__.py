"""Alerting on the rollups: rules managed as code (`rules`), vectorised evaluation of every rule
for one window (`evaluate`), and episodes with their outbox of notifications (`lifecycle`).

No Dagster here: the asset checks in `energy_pipeline.defs.alerts` call these modules.
"""
