"""Launching the Dagster daemon and webserver of this project: one place for `live` and the tests.

`dagster_home` writes an instance directory holding the project's `dagster.yaml`; the `*_command`
functions say how each process is started against `workspace.yaml`; `start_daemon` and `stop`
manage a daemon process (and its code servers and run workers) whose output goes to a log file.
Nothing here imports Dagster.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from energy_pipeline.config import PROJECT_ROOT, dagster_storage_url

WORKSPACE = PROJECT_ROOT / "workspace.yaml"
BIN_DIR = Path(sys.executable).parent


def dagster_home(path: Path, replace: Mapping[str, str] | None = None) -> Path:
    """`path` made a DAGSTER_HOME holding the project's `dagster.yaml`.

    `replace` maps text of the shipped file to what it becomes (e.g. a shorter poll interval in
    a test); each must occur in the file.
    """
    text = (PROJECT_ROOT / "dagster.yaml").read_text()
    for old, new in (replace or {}).items():
        if old not in text:
            raise ValueError(f"dagster.yaml has no {old!r}")
        text = text.replace(old, new)
    path.mkdir(parents=True, exist_ok=True)
    (path / "dagster.yaml").write_text(text)
    return path


def dagster_env(
    home: Path, dagster_pg_url: str, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """This process's environment plus what Dagster's processes need: DAGSTER_HOME, the
    instance storage URL (pinned to psycopg2) and `extra`."""
    return {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "DAGSTER_PG_URL": dagster_storage_url(dagster_pg_url),
        **(extra or {}),
    }


def daemon_command(workspace: Path = WORKSPACE) -> list[str]:
    """The project's daemon (`energy_pipeline.daemon`: `dagster-daemon run` with one-second sensor
    loops and outage-throttled logging) on `workspace`."""
    return [sys.executable, "-m", "energy_pipeline.daemon", "run", "-w", str(workspace)]


def webserver_command(port: int, workspace: Path = WORKSPACE, host: str = "127.0.0.1") -> list[str]:
    """`dagster-webserver` on `host:port` serving `workspace`."""
    return [str(BIN_DIR / "dagster-webserver"), "-h", host, "-p", str(port), "-w", str(workspace)]


def start(
    command: Sequence[str], env: Mapping[str, str], log_path: Path, cwd: Path = PROJECT_ROOT
) -> subprocess.Popen:
    """`command` in its own session (so `stop` reaches its whole process tree: code servers and
    run workers), its output appended to `log_path`."""
    with log_path.open("ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            list(command),
            cwd=cwd,
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def start_daemon(env: Mapping[str, str], log_path: Path) -> subprocess.Popen:
    """The Dagster daemon on the project's workspace, output to `log_path`."""
    return start(daemon_command(), env, log_path)


def stop(
    proc: subprocess.Popen,
    sig: int = signal.SIGINT,
    whole_session: bool = False,
    timeout_s: float = 30,
) -> None:
    """Ends a process started by `start`, and everything left in its session.

    `sig` goes to the process (SIGINT: the daemon stops its threads and code servers cleanly), or
    with `whole_session` to every process of its session at once (SIGKILL then is a crash of the
    whole tree). Whatever is still alive after `timeout_s` is killed.
    """
    try:
        if whole_session:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_session(proc.pid)
        proc.wait(timeout=timeout_s)
    if not _session_ended(proc.pid, timeout_s):
        _kill_session(proc.pid)
        _session_ended(proc.pid, 5)


def _session_ended(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def _kill_session(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
