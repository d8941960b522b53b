"""The one launcher of Dagster's processes: instance directory, commands, start and stop."""

from __future__ import annotations

import os
import signal
import sys
import time

import dagster as dg
import pytest

from energy_pipeline.config import PROJECT_ROOT
from energy_pipeline.devtools import dagster_stack


def test_dagster_home_holds_the_shipped_instance_config(tmp_path):
    home = dagster_stack.dagster_home(tmp_path / "home")
    assert (home / "dagster.yaml").read_text() == (PROJECT_ROOT / "dagster.yaml").read_text()
    changed = dagster_stack.dagster_home(
        tmp_path / "other", {"poll_interval_seconds: 30": "poll_interval_seconds: 2"}
    )
    assert "poll_interval_seconds: 2\n" in (changed / "dagster.yaml").read_text()
    with pytest.raises(ValueError, match="no 'not in the file'"):
        dagster_stack.dagster_home(tmp_path / "bad", {"not in the file": "x"})


def test_shipped_instance_turns_off_the_first_visit_pop_up(tmp_path, dagster_db, monkeypatch):
    home = dagster_stack.dagster_home(tmp_path / "home")
    for key, value in dagster_stack.dagster_env(home, dagster_db).items():
        if key.startswith("DAGSTER_"):
            monkeypatch.setenv(key, value)
    with dg.DagsterInstance.get() as instance:
        assert not instance.is_ephemeral  # an ephemeral instance never shows it anyway
        assert instance.get_settings("nux") == {"enabled": False}
        # What the webserver asks before showing the pop-up (GraphQL `shouldShowNux`).
        assert instance.nux_enabled is False


def test_env_pins_the_storage_url_to_psycopg2(tmp_path):
    env = dagster_stack.dagster_env(tmp_path, "postgresql://u@h/db", {"X": "1"})
    assert env["DAGSTER_HOME"] == str(tmp_path)
    assert env["DAGSTER_PG_URL"] == "postgresql+psycopg2://u@h/db"
    assert env["X"] == "1"


def test_commands_use_the_project_workspace():
    workspace = str(PROJECT_ROOT / "workspace.yaml")
    assert dagster_stack.daemon_command() == [
        sys.executable, "-m", "energy_pipeline.daemon", "run", "-w", workspace
    ]  # fmt: skip
    web = dagster_stack.webserver_command(3123)
    assert web[0].endswith("dagster-webserver")
    assert web[1:] == ["-h", "127.0.0.1", "-p", "3123", "-w", workspace]


@pytest.mark.parametrize("whole_session", [False, True])
def test_stop_ends_the_process_and_its_session(tmp_path, whole_session):
    # A parent with a child that would outlive it (as code servers and run workers could).
    script = (
        "import subprocess, time; subprocess.Popen(['sleep', '300']); "
        "print('child started', flush=True); time.sleep(300)"
    )
    log = tmp_path / "out.log"
    proc = dagster_stack.start([sys.executable, "-c", script], os.environ, log)
    assert os.getpgid(proc.pid) == proc.pid  # its own session
    deadline = time.monotonic() + 10
    while "child started" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    dagster_stack.stop(proc, signal.SIGTERM, whole_session=whole_session, timeout_s=5)
    assert proc.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)
