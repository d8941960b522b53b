"""The live supervisor with real short-lived child processes: restarts, backoff, clean stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from energy_pipeline.devtools.supervisor import ChildSpec, RestartPolicy, Supervisor

FAST = RestartPolicy(initial_s=0.05, max_s=0.4, reset_after_s=30)


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def _wait_for(check, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("failures", "expected"), [(1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (7, 60.0), (50, 60.0)]
)
def test_backoff_doubles_up_to_the_cap(failures: int, expected: float) -> None:
    assert RestartPolicy(initial_s=1, max_s=60).delay(failures) == expected


def test_child_that_dies_is_restarted_with_its_exit_code_logged(tmp_path: Path) -> None:
    messages: list[str] = []
    sup = Supervisor(
        [
            ChildSpec("dies", _py("import sys; sys.exit(3)"), tmp_path / "dies.log"),
            ChildSpec("lives", _py("import time; time.sleep(60)")),
        ],
        policy=FAST,
        say=messages.append,
        poll_s=0.02,
    )
    sup.run(duration_s=1.5)
    # Backoff 0.05, 0.1, 0.2, 0.4, 0.4 ... s: a handful of restarts, not hundreds.
    assert 3 <= sup.restarts("dies") <= 10
    assert set(sup.exit_codes("dies")) == {3}
    assert sup.restarts("lives") == 0
    assert sup.exit_codes("lives") == []
    assert sup.pid("lives") is None  # stopped at the end, by the supervisor
    assert any("dies exited with code 3" in m and "restarting in" in m for m in messages)
    assert not any("lives exited" in m for m in messages)


def test_delay_resets_after_a_healthy_run(tmp_path: Path) -> None:
    policy = RestartPolicy(initial_s=0.05, max_s=10, reset_after_s=0.3)
    messages: list[str] = []
    sup = Supervisor(
        [ChildSpec("flaky", _py("import sys, time; time.sleep(0.4); sys.exit(1)"))],
        policy=policy,
        say=messages.append,
        poll_s=0.02,
    )
    sup.run(duration_s=2.0)
    delays = [m.split("restarting in ")[1] for m in messages if "restarting in" in m]
    assert len(delays) >= 3
    assert set(delays) == {"0s"}  # 0.05 s each time: it ran longer than reset_after_s


def test_sigterm_stops_supervisor_and_children_cleanly(tmp_path: Path) -> None:
    """`live`'s own process gets SIGTERM: it stops the children (and their children) and exits 0."""
    pid_file = tmp_path / "grandchild.pid"
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import signal, subprocess, sys
            from energy_pipeline.devtools.supervisor import ChildSpec, Supervisor
            parent = (
                "import subprocess, sys, time;"
                "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']);"
                "open({str(pid_file)!r}, 'w').write(str(p.pid));"
                "time.sleep(120)"
            )
            sup = Supervisor(
                [
                    ChildSpec("parent", [sys.executable, "-c", parent]),
                    ChildSpec("dies", [sys.executable, "-c", "import sys; sys.exit(3)"]),
                ],
                say=lambda m: print(m, flush=True),
            )
            signal.signal(signal.SIGTERM, sup.request_stop)
            sup.run()
            print("stopped", flush=True)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        _wait_for(lambda: pid_file.exists() and pid_file.read_text() != "")
        time.sleep(1.5)  # let "dies" exit and be restarted at least once
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert "dies exited with code 3" in out
    assert out.rstrip().endswith("stopped")
    grandchild = int(pid_file.read_text())
    _wait_for(lambda: not _alive(grandchild), timeout_s=5)


def test_stop_kills_a_child_that_ignores_sigint(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    code = f"""
        import signal, time
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        open({str(ready)!r}, "w").close()
        time.sleep(60)
    """
    messages: list[str] = []
    sup = Supervisor(
        [ChildSpec("stubborn", _py(code))], say=messages.append, poll_s=0.02, stop_timeout_s=0.5
    )
    started = time.monotonic()
    sup.run(duration_s=1.0)
    assert ready.exists()
    assert time.monotonic() - started < 10
    assert sup.pid("stubborn") is None
    assert any("did not stop within" in m for m in messages)


def test_unique_names_required() -> None:
    with pytest.raises(ValueError, match="unique"):
        Supervisor([ChildSpec("a", ["true"]), ChildSpec("a", ["true"])])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (its parent may not have reaped it yet).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False
