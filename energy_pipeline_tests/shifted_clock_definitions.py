"""The project's definitions as a code location loaded at another time, for the partition window
test: `ENERGY_TEST_CLOCK_DAYS_FILE` holds how many days from now (negative: ago) the code is
loaded at. Read on every load, so a reload picks up a new value."""

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from energy_pipeline.config import Settings
from energy_pipeline.definitions import build_definitions

_days = float(Path(os.environ["ENERGY_TEST_CLOCK_DAYS_FILE"]).read_text())
defs = build_definitions(Settings.from_env(), now=datetime.now(UTC) + timedelta(days=_days))
