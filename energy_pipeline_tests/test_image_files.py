"""The production image's files: the package without energy_pipeline/devtools, as docker/Dockerfile
builds it, imports and runs its production commands.

The venv's setuptools is older than the one pyproject.toml asks for, so the wheel's file set is put
together here from pyproject.toml's own package discovery and package data, with setuptools'
finder. The subprocesses run with `-S` so that the editable install of this checkout (a `.pth`
import hook that would find the devtools) is not loaded; site-packages comes in by PYTHONPATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
from pathlib import Path

import pytest
from setuptools import find_namespace_packages

from energy_pipeline.cli import build_parser
from energy_pipeline.config import PROJECT_ROOT


def production_files(source: Path, target: Path) -> None:
    """What the production wheel installs into site-packages: docker/Dockerfile copies
    pyproject.toml and the package, deletes energy_pipeline/devtools, then builds the wheel."""
    shutil.copy(PROJECT_ROOT / "pyproject.toml", source / "pyproject.toml")
    shutil.copytree(
        PROJECT_ROOT / "energy_pipeline",
        source / "energy_pipeline",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.rmtree(source / "energy_pipeline" / "devtools")  # as the Dockerfile's `rm -rf`

    tool = tomllib.loads((source / "pyproject.toml").read_text())["tool"]["setuptools"]
    find = tool["packages"]["find"]
    # pyproject.toml's packages.find looks for namespace packages too (migrations/versions).
    packages = find_namespace_packages(
        str(source), include=find.get("include", ["*"]), exclude=find.get("exclude", [])
    )
    for package in packages:
        directory = source.joinpath(*package.split("."))
        (target / directory.relative_to(source)).mkdir(parents=True, exist_ok=True)
        patterns = ["*.py"] + [
            p for owner, globs in tool.get("package-data", {}).items() if owner == package
            for p in globs
        ]  # fmt: skip
        for pattern in patterns:
            for path in directory.glob(pattern):
                destination = target / path.relative_to(source)
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, destination)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source, target = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("site")
    production_files(source, target)
    return target


def run_python(site: Path, code: str, env: dict[str, str] | None = None) -> str:
    """Run `code` in a fresh interpreter that sees the production files and the installed
    dependencies only; its stdout."""
    path = os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]])
    result = subprocess.run(
        [sys.executable, "-S", "-c", textwrap.dedent(code)],
        cwd=site.parent,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": path, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_production_files_leave_out_the_devtools_and_keep_the_migrations(site):
    package = site / "energy_pipeline"
    assert not (package / "devtools").exists()
    assert (package / "definitions.py").is_file()
    assert (package / "migrations" / "env.py").is_file()
    assert any((package / "migrations" / "versions").glob("0001*.py"))


# Development commands: the rest must work in the production image.
DEV_COMMANDS = {"services", "simulate", "bench", "live"}


def test_production_package_imports_without_the_devtools(site):
    out = run_python(
        site,
        f"""
        import importlib, importlib.util, pkgutil, sys
        import energy_pipeline
        assert energy_pipeline.__file__.startswith({str(site)!r}), energy_pipeline.__file__
        assert importlib.util.find_spec("energy_pipeline.devtools") is None
        import energy_pipeline.definitions
        assert energy_pipeline.definitions.defs.resolve_asset_graph().get_all_asset_keys()
        walk = pkgutil.walk_packages(energy_pipeline.__path__, "energy_pipeline.")
        modules = [m.name for m in walk]
        for name in modules:
            # Migration scripts run only inside alembic (test_migrate_from_the_production_files).
            if not name.startswith("energy_pipeline.migrations."):
                importlib.import_module(name)
        loaded = [m for m in sys.modules if m.startswith("energy_pipeline")]
        site = {str(site)!r}
        outside = [m for m in loaded if not (sys.modules[m].__file__ or "").startswith(site)]
        assert not outside, outside
        assert not [m for m in loaded if m.startswith("energy_pipeline.devtools")]
        print(len(modules))
        """,
    )
    assert int(out) > 20


def test_production_commands_run_and_dev_commands_say_what_is_missing(site):
    commands = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    production = sorted(commands - DEV_COMMANDS)
    assert {"migrate", "init", "devices"} <= set(production)
    out = run_python(
        site,
        f"""
        import contextlib, io, sys
        from energy_pipeline.cli import main

        def run(argv):
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(argv)
                except SystemExit as exit:
                    code = exit.code
            return code, out.getvalue(), err.getvalue()

        code, out, _ = run(["--help"])
        assert code == 0 and "migrate" in out, (code, out)
        for command in {production!r}:
            code, out, err = run([command, "--help"])
            assert code == 0 and "usage:" in out, (command, code, err)
        for argv in (["simulate"], ["services", "status"], ["live"], ["bench", "--quick"]):
            code, out, err = run(argv)
            assert code == 2, (argv, code, err)
            assert "needs the development tools" in err and "Traceback" not in err, err
        print("ok")
        """,
    )
    assert out.strip() == "ok"


def test_migrate_from_the_production_files(site, pg_dsn):
    """The image's `migrate` service: `energy-pipeline migrate` with the production files only."""
    out = run_python(
        site,
        """
        import sys
        from energy_pipeline.cli import main
        sys.exit(main(["migrate"]))
        """,
        env={"ENERGY_PG_DSN": pg_dsn},
    )
    assert "newest revision" in out
