"""Alerting on the rollups: rules managed as code (`rules`), vectorised evaluation of every rule
for one window (`evaluate`), the rollup tables' contract (`contracts`), episodes with their
outbox of notifications (`lifecycle`), and sending those notifications (`channels`,
`delivery`).

No Dagster here except the channels' resource: the asset checks in `energy_pipeline.defs.alerts`
call these modules.
"""
