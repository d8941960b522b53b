"""A run launcher whose run processes have their libraries imported before the run exists.

Dagster's default launcher asks the code server to start each run in a fresh interpreter, which
imports dagster, polars, pandera and psycopg before the first step can begin: about 2 s of the
path from a minute's close to its alert on a loaded two-core host (docs/benchmark.md). Here each
run still gets a process of its own, as with the default launcher, but that process was started
earlier and has already imported those libraries: the launcher keeps `spares` such interpreters
waiting, hands a run to one over its stdin, and starts a replacement a few seconds later (not at
once, so its imports do not compete with the run that was just launched).

A spare imports only third-party libraries (`PRELOAD`), never this project's modules, so a run
always executes the project code found on disk when it starts. A run whose code location is not
a Python module or file of a local environment (a separately deployed gRPC server) is launched
the default way, and so is a run when a spare cannot be started.

A spare says on a pipe of its own when its imports are done (`ready`) and when it has read
the run handed to it (`took`). A run goes to a ready spare when one waits, else to one still
importing (or started now), so a spare that dies on the way must not strand its run: run
monitoring asks a launcher only about STARTED runs, and would leave a STARTING one until its start
timeout. The launcher therefore waits on every process it handed a run to: one that exits before
its run started fails the run at once (a CANCELING run is marked CANCELED). A process that exits
while its run is STARTED is reported FAILED by the health check, and monitoring fails the run
within a poll interval instead of at the runtime limit. Termination works from any process: the
run is marked CANCELING, which the run process watches for (and a local one also gets an
interrupt at once, or is killed if it has not taken the run yet: it holds nothing of the run).

Run `python -m energy_pipeline.run_launcher FD` is the spare (FD: the write end of its pipe to
the launcher): it is started only by the launcher.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

import dagster as dg
from dagster._core.launcher.base import CheckRunHealthResult, LaunchRunContext, WorkerStatus
from dagster._core.remote_origin import ManagedGrpcPythonEnvCodeLocationOrigin
from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus
from dagster._core.storage.tags import GRPC_INFO_TAG
from dagster._grpc.types import ExecuteRunArgs
from dagster._serdes import ConfigurableClassData, serialize_value

# What a run of this project imports that is not the project itself (measured with
# `python -X importtime -c "import energy_pipeline.definitions"`: these are ~85 % of it).
PRELOAD = (
    "dagster",
    "dagster._cli.api",
    "dagster_postgres",
    "polars",
    "pandera.polars",
    "psycopg",
    "requests",
    "yaml",
)

WORKER_MODULE = "energy_pipeline.run_launcher"
_log = logging.getLogger(__name__)

# A spare's interpreter and working directory: those of the code location it serves.
SpareKey = tuple[str, str | None]


class WarmRunLauncher(dg.DefaultRunLauncher):
    """Launches each run in its own pre-started process with the heavy libraries imported."""

    def __init__(
        self,
        inst_data: ConfigurableClassData | None = None,
        spares: int = 2,
        respawn_delay_seconds: float = 5.0,
    ):
        super().__init__(inst_data=inst_data)
        self._spare_count = spares
        self._respawn_delay_s = respawn_delay_seconds
        self._lock = threading.Lock()
        self._spares: dict[SpareKey, list[_Spare]] = {}
        self._workers: dict[str, _Spare] = {}
        self._timers: list[threading.Timer] = []
        self._disposed = False

    @classmethod
    def config_type(cls) -> dict[str, Any]:
        return {
            "spares": dg.Field(int, default_value=2, is_required=False),
            "respawn_delay_seconds": dg.Field(float, default_value=5.0, is_required=False),
        }

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]
    ) -> WarmRunLauncher:
        return cls(inst_data=inst_data, **config_value)

    # Launching

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        key = _spare_key(run)
        usable = key is not None and run.job_code_origin is not None and self._spare_count > 0
        spare = self._take_spare(key) if usable and key is not None else None
        if spare is None or run.job_code_origin is None:
            super().launch_run(context)
            return
        worker = spare.process
        args = ExecuteRunArgs(
            job_origin=run.job_code_origin, run_id=run.run_id, instance_ref=self._instance.get_ref()
        )
        try:
            assert worker.stdin is not None
            worker.stdin.write(serialize_value(args) + "\n")
            worker.stdin.close()
        except (BrokenPipeError, OSError):  # the spare died while waiting: launch the default way
            worker.kill()
            worker.wait()
            super().launch_run(context)
            return
        with self._lock:
            self._workers[run.run_id] = spare
            timer = threading.Timer(self._respawn_delay_s, self._top_up, args=(key,))
            timer.daemon = True
            self._timers.append(timer)
        timer.start()
        state = "" if spare.ready.is_set() else " It is still importing its libraries."
        try:
            self._instance.report_engine_event(
                f"Run handed to a preloaded process (pid {worker.pid}).{state}",
                run,
                cls=self.__class__,
            )
        except Exception:  # noqa: BLE001 - the run executes already, and failing the launch
            # now would mark a running run failed; the run process writes its own events.
            _log.exception("could not record the hand-over of run %s", run.run_id)
        threading.Thread(target=self._watch, args=(run.run_id, spare), daemon=True).start()

    def waiting_spares(self) -> int:
        """How many spares are alive and waiting for a run."""
        with self._lock:
            return sum(s.alive() for group in self._spares.values() for s in group)

    def _take_spare(self, key: SpareKey) -> _Spare | None:
        """A ready spare for `key`, else the one waiting longest (still importing), else one
        started now; None if none can start."""
        with self._lock:
            if self._disposed:
                return None
            spares = self._spares.setdefault(key, [])
            spares[:] = [s for s in spares if s.alive()]
            if spares:
                spare = next((s for s in spares if s.ready.is_set()), spares[0])
                spares.remove(spare)
                return spare
        try:
            return _Spare(key)
        except OSError:
            return None

    def _top_up(self, key: SpareKey) -> None:
        with self._lock:
            self._timers = [t for t in self._timers if t.is_alive()]
            if self._disposed:
                return
            spares = self._spares.setdefault(key, [])
            spares[:] = [s for s in spares if s.alive()]
            missing = self._spare_count - len(spares)
            try:
                spares.extend(_Spare(key) for _ in range(max(missing, 0)))
            except OSError:
                pass  # launches fall back to the default way until a spare can start
        self._reap()

    def _reap(self) -> None:
        """Forgets run processes that have exited and whose runs are finished (the run storage is
        asked outside the lock, so an unreachable database does not hold up launches)."""
        with self._lock:
            exited = [r for r, spare in self._workers.items() if not spare.alive()]
        done = []
        for run_id in exited:
            run = self._instance.get_run_by_id(run_id)
            if run is None or run.is_finished:
                done.append(run_id)
        with self._lock:
            for run_id in done:
                self._workers.pop(run_id, None)

    def _watch(self, run_id: str, spare: _Spare) -> None:
        """Waits for the process a run was handed to (reaping it) and ends the run if the process
        exited before starting it; a run that had started is left to run monitoring."""
        code = spare.process.wait()
        spare.closed.wait(timeout=5)  # its last words on the pipe
        try:
            run = self._instance.get_run_by_id(run_id)
            if run is None or run.is_finished:
                return
            if not spare.ready.is_set():
                when = "while importing its libraries, before the run started"
            elif not spare.took_run.is_set():
                when = "before it read the run"
            else:
                when = "before the run started"
            what = f"The run's process (pid {spare.process.pid}) exited with code {code} {when}."
            if run.status == DagsterRunStatus.CANCELING:
                self._instance.report_run_canceled(run, what)
            elif run.status in (DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING):
                self._instance.report_run_failed(run, f"{what} Its output is in the daemon log.")
        except Exception:  # noqa: BLE001 - a thread of its own: log, and monitoring times it out
            _log.exception("could not end run %s after its process exited", run_id)

    # Monitoring and termination

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        with self._lock:
            spare = self._workers.get(run.run_id)
        if spare is None:
            # Launched by the code server, or before this process started: nothing to ask, so
            # it counts as running (as with the default launcher); the runtime limit applies.
            return CheckRunHealthResult(WorkerStatus.RUNNING, "not a process of this launcher")
        worker = spare.process
        code = worker.poll()
        if code is None:
            return CheckRunHealthResult(WorkerStatus.RUNNING, run_worker_id=str(worker.pid))
        if code == 0:
            # Dagster's run body returns 0 also when it could not record a failure: a process
            # gone while its run is unfinished has failed, whatever its exit code.
            current = self._instance.get_run_by_id(run.run_id)
            if current is not None and not current.is_finished:
                return CheckRunHealthResult(
                    WorkerStatus.FAILED,
                    f"run process {worker.pid} exited while the run was {current.status.value}",
                    run_worker_id=str(worker.pid),
                )
            return CheckRunHealthResult(WorkerStatus.SUCCESS, run_worker_id=str(worker.pid))
        return CheckRunHealthResult(
            WorkerStatus.FAILED,
            f"run process {worker.pid} exited with code {code}",
            run_worker_id=str(worker.pid),
        )

    def terminate(self, run_id: str) -> bool:
        run = self._instance.get_run_by_id(run_id)
        if run is None or run.is_finished:
            return False
        if GRPC_INFO_TAG in run.tags:  # launched by the code server
            return super().terminate(run_id)
        self._instance.report_run_canceling(run)
        with self._lock:
            spare = self._workers.get(run_id)
        if spare is not None and spare.alive():
            if spare.took_run.is_set():
                spare.process.send_signal(signal.SIGINT)
            else:  # an interrupt amid its imports would only crash it; `_watch` ends the run
                spare.process.kill()
        # Otherwise the run process sees CANCELING itself (its cancellation thread).
        return True

    def join(self, timeout: int = 30) -> None:
        """Waits until the runs handed to run processes have finished and their processes have
        exited, then for the runs launched the default way (DefaultRunLauncher.join); raises
        TimeoutError after `timeout` seconds in all, naming the runs still unfinished."""
        deadline = time.monotonic() + timeout
        while True:
            self._reap()
            with self._lock:
                waiting = list(self._workers)
            if not waiting:
                break
            if time.monotonic() >= deadline:
                raise TimeoutError(f"Timed out waiting for these runs to finish: {waiting!r}")
            time.sleep(0.1)
        super().join(timeout=max(int(deadline - time.monotonic()), 0))

    def dispose(self) -> None:
        with self._lock:
            self._disposed = True
            for timer in self._timers:
                timer.cancel()
            spares = [s for group in self._spares.values() for s in group]
            self._spares.clear()
        for spare in spares:  # end of stdin: a spare exits without running anything
            if spare.process.stdin is not None:
                spare.process.stdin.close()
        for spare in spares:
            try:
                spare.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                spare.process.kill()
                spare.process.wait()
        super().dispose()


def _spare_key(run: DagsterRun) -> SpareKey | None:
    """The interpreter and working directory of the run's code location, when that is a Python
    module or file this host can start; None for a separately deployed code server."""
    remote = run.remote_job_origin
    if remote is None:
        return None
    origin = remote.repository_origin.code_location_origin
    if not isinstance(origin, ManagedGrpcPythonEnvCodeLocationOrigin):
        return None
    target = origin.loadable_target_origin
    return (target.executable_path or sys.executable, target.working_directory)


class _Spare:
    """A spare process, and what it has said on its pipe: `ready` once its libraries are
    imported, `took` once it has read its run; the pipe closes when it exits or runs the run."""

    def __init__(self, key: SpareKey) -> None:
        executable, working_directory = key
        read_fd, write_fd = os.pipe()
        try:
            self.process = subprocess.Popen(
                [executable, "-m", WORKER_MODULE, str(write_fd)],
                stdin=subprocess.PIPE,
                cwd=working_directory or None,
                text=True,
                pass_fds=(write_fd,),
            )
        except OSError:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self.ready = threading.Event()
        self.took_run = threading.Event()
        self.closed = threading.Event()
        threading.Thread(target=self._listen, args=(read_fd,), daemon=True).start()

    def alive(self) -> bool:
        return self.process.poll() is None

    def _listen(self, read_fd: int) -> None:
        with open(read_fd, encoding="ascii") as pipe:
            for line in pipe:
                if line == "ready\n":
                    self.ready.set()
                elif line == "took\n":
                    self.took_run.set()
        self.closed.set()


# The spare process


def _preload() -> None:
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # the run imports what it needs anyway; a missing extra only costs time


def _execute(line: str) -> int:
    """Executes the run `line` names, as `dagster api execute_run` does, plus a thread that
    interrupts the run when it is marked CANCELING from another process."""
    from dagster._cli.api import _execute_run_command_body
    from dagster._cli.utils import get_instance_for_cli
    from dagster._core.execution.run_cancellation_thread import start_run_cancellation_thread
    from dagster._serdes import deserialize_value
    from dagster._utils.interrupts import capture_interrupts

    with capture_interrupts():
        args = deserialize_value(line, ExecuteRunArgs)
        with get_instance_for_cli(instance_ref=args.instance_ref) as instance:
            watcher, stop_watching = start_run_cancellation_thread(instance, args.run_id)
            try:
                return _execute_run_command_body(
                    args.run_id, instance, lambda _event: None, set_exit_code_on_failure=False
                )
            finally:
                stop_watching.set()
                watcher.join(timeout=15)


def _say(pipe: int, word: str) -> None:
    with contextlib.suppress(OSError):  # the launcher is gone: stdin tells the rest
        os.write(pipe, f"{word}\n".encode())


def worker_main() -> int:
    pipe = int(sys.argv[1])
    _preload()
    _say(pipe, "ready")
    line = sys.stdin.readline().strip()
    if not line:  # dismissed (or the launcher's process ended) before it got a run
        return 0
    _say(pipe, "took")
    os.close(pipe)  # not inherited by what the run starts
    return _execute(line)


if __name__ == "__main__":
    sys.exit(worker_main())
