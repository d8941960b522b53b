"""WarmRunLauncher (energy_pipeline/run_launcher.py) against a real Dagster instance on PostgreSQL:
runs execute in preloaded processes, one per run, with the project code found on disk at launch;
run monitoring sees a run process that died; a run is terminated from another process; a run
whose process dies or is terminated before it started the run ends at once; join waits for runs."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus
from dagster._core.launcher import WorkerStatus
from dagster._core.remote_origin import GrpcServerCodeLocationOrigin
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.test_utils import create_run_for_test
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import ModuleTarget

from energy_pipeline.devtools import dagster_stack
from energy_pipeline.run_launcher import WarmRunLauncher, _spare_key

PROBE = """
import json, os, sys, time
from pathlib import Path
import dagster as dg

# Whether this process had polars before the job's module was imported: only a preloaded one has.
POLARS_PRELOADED = "polars" in sys.modules
VERSION = {version!r}


@dg.op(config_schema={{"out": str, "sleep_s": dg.Field(float, default_value=0.0),
                       "exit_quietly": dg.Field(bool, default_value=False)}})
def probe(context):
    out = Path(context.op_config["out"])
    out.write_text(json.dumps({{"pid": os.getpid(), "polars_preloaded": POLARS_PRELOADED,
                               "version": VERSION}}))
    if context.op_config["exit_quietly"]:  # gone with exit code 0, recording nothing
        os._exit(0)
    time.sleep(context.op_config["sleep_s"])


@dg.job(executor_def=dg.in_process_executor)
def probe_job():
    probe()


defs = dg.Definitions(jobs=[probe_job])
"""


def _write_probe(code_dir: Path, version: str) -> None:
    (code_dir / "launcher_probe.py").write_text(PROBE.format(version=version))
    for cached in (code_dir / "__pycache__").glob("launcher_probe*"):
        cached.unlink()


def _wait(what: str, check: Callable[[], Any], timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture
def stack(tmp_path: Path, dagster_db: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """An instance from the project's dagster.yaml (spares topped up at once), and a workspace
    whose code location is the probe module in `tmp_path/code`."""
    home = dagster_stack.dagster_home(
        tmp_path / "home", {"respawn_delay_seconds: 5": "respawn_delay_seconds: 0"}
    )
    for key, value in dagster_stack.dagster_env(home, dagster_db).items():
        if key.startswith("DAGSTER_"):
            monkeypatch.setenv(key, value)
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    _write_probe(code_dir, "first")
    with DagsterInstance.get() as instance:
        target = ModuleTarget("launcher_probe", None, str(code_dir), "probe")
        with WorkspaceProcessContext(instance, target) as context:
            yield instance, context, code_dir
        instance.run_launcher.dispose()


# Put first on a spare's sys.path: its start-up waits until the gate file exists, then exits
# with code 3, as an interpreter that cannot import the launcher does.
GATE = """
import os, time
from pathlib import Path

while not Path(os.environ["LAUNCHER_TEST_GATE"]).exists():
    time.sleep(0.05)
os._exit(3)
"""


@pytest.fixture
def gated_spares(stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Spares started from now on hang at start-up until the returned gate file is created, then
    exit with code 3; the code server, started before, is not affected."""
    site = tmp_path / "gate_site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(GATE)
    gate = tmp_path / "gate"
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.setenv("LAUNCHER_TEST_GATE", str(gate))
    yield gate
    gate.touch()  # ends the spares still waiting before the launcher is disposed


def _launch(stack: Any, out: Path, sleep_s: float = 0.0, exit_quietly: bool = False) -> DagsterRun:
    instance, context, _ = stack
    workspace = context.create_request_context()
    location = workspace.get_code_location("probe")
    job = location.get_repository("__repository__").get_full_job("probe_job")
    probe = {"out": str(out), "sleep_s": sleep_s, "exit_quietly": exit_quietly}
    config = {"ops": {"probe": {"config": probe}}}
    plan = location.get_execution_plan(
        job, run_config=config, step_keys_to_execute=None, known_state=None, instance=instance
    )
    run = create_run_for_test(
        instance,
        job_name="probe_job",
        run_config=config,
        remote_job_origin=job.get_remote_origin(),
        job_code_origin=job.get_python_origin(),
        job_snapshot=job.job_snapshot,
        execution_plan_snapshot=plan.execution_plan_snapshot,
    )
    return instance.launch_run(run.run_id, workspace)


def _finished(instance: DagsterInstance, run_id: str) -> DagsterRun | None:
    run = instance.get_run_by_id(run_id)
    return run if run is not None and run.is_finished else None


def _handed_to(instance: DagsterInstance, run_id: str) -> int:
    """The pid the launcher's engine event names for the run."""
    for record in instance.all_logs(run_id):
        message = record.dagster_event.message if record.dagster_event else None
        if message and "preloaded process (pid" in message:
            return int(message.split("pid ")[1].split(")")[0])
    raise AssertionError(f"run {run_id} has no hand-over event")


def test_runs_execute_in_preloaded_processes_with_the_code_on_disk(stack, tmp_path: Path):
    instance, _, code_dir = stack
    launcher = instance.run_launcher
    assert isinstance(launcher, WarmRunLauncher)

    first = _launch(stack, tmp_path / "first.json")
    done = _wait("the first run", lambda: _finished(instance, first.run_id))
    assert done.status == DagsterRunStatus.SUCCESS
    seen = json.loads((tmp_path / "first.json").read_text())
    assert seen["pid"] == _handed_to(instance, first.run_id)
    assert seen["version"] == "first"

    # Spares started after the first launch exist before the code changes on disk.
    _wait("spares", lambda: launcher.waiting_spares() == 2)
    _write_probe(code_dir, "second")
    second = _launch(stack, tmp_path / "second.json")
    done = _wait("the second run", lambda: _finished(instance, second.run_id))
    assert done.status == DagsterRunStatus.SUCCESS
    seen_second = json.loads((tmp_path / "second.json").read_text())
    assert seen_second["polars_preloaded"] is True  # a spare: libraries imported beforehand
    assert seen_second["version"] == "second"  # ... but the project code read at launch
    assert seen_second["pid"] == _handed_to(instance, second.run_id) != seen["pid"]
    _wait(
        "the run process to exit",
        lambda: launcher.check_run_worker_health(done).status == WorkerStatus.SUCCESS,
    )


def test_monitoring_sees_a_run_process_that_died(stack, tmp_path: Path):
    instance, _, _ = stack
    run = _launch(stack, tmp_path / "out.json", sleep_s=120)
    _wait("the run to start", lambda: (tmp_path / "out.json").exists())
    assert instance.run_launcher.check_run_worker_health(run).status == WorkerStatus.RUNNING
    os.kill(_handed_to(instance, run.run_id), signal.SIGKILL)
    health = _wait(
        "the launcher to see the process gone",
        lambda: (
            (h := instance.run_launcher.check_run_worker_health(run)).status == WorkerStatus.FAILED
            and h
        ),
    )
    assert "exited with code -9" in (health.msg or "")


def test_a_run_process_gone_with_exit_code_0_while_its_run_is_unfinished_has_failed(
    stack, tmp_path: Path
):
    instance, _, _ = stack
    run = _launch(stack, tmp_path / "out.json", exit_quietly=True)
    health = _wait(
        "the launcher to see the process gone",
        lambda: (
            (h := instance.run_launcher.check_run_worker_health(run)).status != WorkerStatus.RUNNING
            and h
        ),
    )
    assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.STARTED
    assert health.status == WorkerStatus.FAILED
    assert "exited while the run was STARTED" in (health.msg or "")


def test_a_run_is_terminated_from_another_process(stack, tmp_path: Path):
    instance, _, _ = stack
    run = _launch(stack, tmp_path / "out.json", sleep_s=120)
    _wait("the run to start", lambda: (tmp_path / "out.json").exists())
    # Another process (the webserver, say) has its own launcher, which holds no run processes.
    with DagsterInstance.from_ref(instance.get_ref()) as other:
        assert other.run_launcher.terminate(run.run_id) is True
    done = _wait("the run to end", lambda: _finished(instance, run.run_id), timeout_s=60)
    assert done.status == DagsterRunStatus.CANCELED


def _reaped(pid: int) -> bool:
    """Whether the process is gone (a zombie still has its /proc entry)."""
    return not Path(f"/proc/{pid}").exists()


@pytest.mark.parametrize("death", ["killed while importing", "cannot start"])
def test_a_run_whose_process_dies_before_starting_it_fails_at_once(
    stack, gated_spares: Path, tmp_path: Path, death: str
):
    instance, _, _ = stack
    run = _launch(stack, tmp_path / "out.json")  # no spare is ready: one is started for it
    pid = _handed_to(instance, run.run_id)
    if death == "killed while importing":
        os.kill(pid, signal.SIGKILL)
    else:
        gated_spares.touch()
    # Only the launcher can end the run before run monitoring's start timeout (180 s):
    # monitoring asks a launcher about the health of STARTED runs only.
    done = _wait("the run to end", lambda: _finished(instance, run.run_id))
    assert done.status == DagsterRunStatus.FAILURE
    code = -9 if death == "killed while importing" else 3
    failure = instance.all_logs(run.run_id, of_type=DagsterEventType.RUN_FAILURE)
    assert [e.message for e in failure] == [
        f"The run's process (pid {pid}) exited with code {code} while importing its libraries,"
        " before the run started. Its output is in the daemon log."
    ]
    assert not (tmp_path / "out.json").exists()
    assert _reaped(pid)


def test_terminating_a_run_whose_process_is_still_importing_cancels_it(
    stack, gated_spares: Path, tmp_path: Path
):
    instance, _, _ = stack
    run = _launch(stack, tmp_path / "out.json")
    pid = _handed_to(instance, run.run_id)
    assert instance.run_launcher.terminate(run.run_id) is True
    done = _wait("the run to end", lambda: _finished(instance, run.run_id))
    assert done.status == DagsterRunStatus.CANCELED
    # Killed (it held nothing of the run yet), not interrupted amid its imports, and reaped.
    canceled = instance.all_logs(run.run_id, of_type=DagsterEventType.RUN_CANCELED)
    assert [e.message for e in canceled] == [
        f"The run's process (pid {pid}) exited with code -9 while importing its libraries,"
        " before the run started."
    ]
    assert not (tmp_path / "out.json").exists()
    assert _reaped(pid)


def test_join_waits_for_the_runs_handed_to_run_processes(stack, tmp_path: Path):
    instance, _, _ = stack
    launcher = instance.run_launcher
    run = _launch(stack, tmp_path / "out.json", sleep_s=120)
    _wait("the run to start", lambda: (tmp_path / "out.json").exists())
    with pytest.raises(TimeoutError, match=run.run_id):
        launcher.join(timeout=1)
    launcher.terminate(run.run_id)
    launcher.join(timeout=60)
    assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.CANCELED
    assert _reaped(_handed_to(instance, run.run_id))


def test_a_run_of_a_separate_code_server_goes_the_default_way():
    origin = GrpcServerCodeLocationOrigin(host="127.0.0.1", port=4000, location_name="remote")

    class Remote:
        class repository_origin:  # noqa: N801 - mirrors the attribute path of an origin
            code_location_origin = origin

    class Run:
        remote_job_origin = Remote

    assert _spare_key(Run) is None  # type: ignore[arg-type]
