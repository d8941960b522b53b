"""Keeps a set of child processes running: restarts a child that exits, with exponential backoff.

`energy-pipeline live` runs the simulator, the Dagster daemon and the webserver under one
`Supervisor`. A child that dies (an outage it could not ride out, a crash) is started again after
a delay that doubles with each quick failure and resets once the child has stayed up for a while,
so a broken child cannot spin the CPU and a healthy one comes back fast. Only a stop request
(Ctrl-C, SIGTERM, a duration) ends the supervisor. Nothing here imports Dagster.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO


@dataclass(frozen=True)
class ChildSpec:
    """A command to keep running, with its environment and the file its output is appended to."""

    name: str
    command: Sequence[str]
    log_path: Path | None = None
    env: Mapping[str, str] | None = None
    cwd: Path | None = None


@dataclass(frozen=True)
class RestartPolicy:
    """Backoff between restarts: `initial_s`, doubled per quick failure, at most `max_s`.

    A child that ran at least `reset_after_s` before exiting counts as healthy: its next restart
    waits `initial_s` again.
    """

    initial_s: float = 1.0
    max_s: float = 60.0
    reset_after_s: float = 60.0

    def delay(self, failures: int) -> float:
        """The wait before the restart that follows `failures` consecutive quick exits (>= 1)."""
        return min(self.max_s, self.initial_s * 2 ** max(0, failures - 1))


@dataclass
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen | None = None
    log: IO[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    restarts: int = 0
    exit_codes: list[int] = field(default_factory=list)


class Supervisor:
    """Starts children, restarts the ones that exit, and stops them all on request."""

    def __init__(
        self,
        specs: Sequence[ChildSpec],
        policy: RestartPolicy | None = None,
        say: Callable[[str], None] = print,
        poll_s: float = 0.2,
        stop_timeout_s: float = 30.0,
    ) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"child names must be unique: {names}")
        self.policy = policy or RestartPolicy()
        self.say = say
        self.poll_s = poll_s
        self.stop_timeout_s = stop_timeout_s
        self._children = {s.name: _Child(s) for s in specs}
        self._stop = threading.Event()

    def pid(self, name: str) -> int | None:
        """The running pid of child `name`, or None while it waits for a restart."""
        proc = self._children[name].proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def restarts(self, name: str) -> int:
        """How many times child `name` has been started again after exiting."""
        return self._children[name].restarts

    def exit_codes(self, name: str) -> list[int]:
        """Exit codes of child `name`'s past processes, oldest first."""
        return list(self._children[name].exit_codes)

    def request_stop(self, *_: object) -> None:
        """Ask `run` to stop its children and return; safe from a signal handler."""
        self._stop.set()

    def _start(self, child: _Child) -> None:
        spec = child.spec
        if child.log is None and spec.log_path is not None:
            child.log = open(spec.log_path, "ab")  # noqa: SIM115 - closed in stop_all
        out = child.log if child.log is not None else subprocess.DEVNULL
        child.proc = subprocess.Popen(
            list(spec.command),
            env=dict(spec.env) if spec.env is not None else None,
            cwd=spec.cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Own process group: a Ctrl-C in the terminal reaches only the supervisor, which then
            # stops each child in order instead of all of them at once mid-write.
            start_new_session=True,
        )
        child.started_at = time.monotonic()
        child.restart_at = None
        where = f", log {spec.log_path}" if spec.log_path else ""
        self.say(f"started {spec.name:<9} pid {child.proc.pid}{where}")

    def _check(self, child: _Child, now: float) -> None:
        proc = child.proc
        if proc is not None:
            code = proc.poll()
            if code is None:
                return
            child.proc = None
            child.exit_codes.append(code)
            # Whatever the dead child spawned (code servers, run workers) must not linger next to
            # the processes its restart will spawn.
            _signal(proc, signal.SIGTERM)
            uptime = now - child.started_at
            child.failures = 1 if uptime >= self.policy.reset_after_s else child.failures + 1
            delay = self.policy.delay(child.failures)
            child.restart_at = now + delay
            where = f"; see {child.spec.log_path}" if child.spec.log_path else ""
            self.say(
                f"{child.spec.name} exited with code {code} after {uptime:.0f}s; "
                f"restarting in {delay:.0f}s{where}"
            )
        if child.restart_at is not None and now >= child.restart_at:
            child.restarts += 1
            self._start(child)

    def run(self, duration_s: float = 0) -> None:
        """Start every child and keep them running until `request_stop` or `duration_s` elapsed."""
        started = time.monotonic()
        try:
            for child in self._children.values():
                self._start(child)
            while not self._stop.is_set():
                now = time.monotonic()
                if duration_s and now - started >= duration_s:
                    break
                for child in self._children.values():
                    self._check(child, now)
                self._stop.wait(self.poll_s)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop_all()

    def stop_all(self) -> None:
        """SIGINT every running child (what Ctrl-C would send), then SIGKILL stragglers."""
        running = [c for c in self._children.values() if c.proc and c.proc.poll() is None]
        for child in running:
            assert child.proc is not None
            _signal(child.proc, signal.SIGINT)
        deadline = time.monotonic() + self.stop_timeout_s
        for child in running:
            assert child.proc is not None
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"{child.spec.name} did not stop within {self.stop_timeout_s:.0f}s")
                _signal(child.proc, signal.SIGKILL)
                child.proc.wait()
        for child in self._children.values():
            if child.log is not None:
                child.log.close()
                child.log = None


def _signal(proc: subprocess.Popen, sig: int) -> None:
    """Signal the child's whole process group (the daemon and webserver spawn their own)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
