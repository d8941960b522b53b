"""Alerting on the rollups: rules managed as code (`rules`), vectorised evaluation of every rule
for one window (`evaluate`), the rollup tables' contract (`contracts`), episodes with their
outbox of notifications (`lifecycle`), and sending those notifications (`channels`,
`delivery`).

No Dagster here: the asset checks, the delivery sensor and the channels' resource
(`AlertChannelsResource`) live in `energy_pipeline.defs.alerts` and call these modules.
"""
