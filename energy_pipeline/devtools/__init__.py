"""Development tooling: simulated devices, local servers, the live stack and the benchmark.

Nothing here is needed to run the pipeline in production; the pipeline never imports it.
"""
