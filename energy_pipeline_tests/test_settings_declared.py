"""Each setting is declared once (variable, default, parser) and documented in one README row."""

from __future__ import annotations

import ast
import dataclasses
import re

import pytest

from energy_pipeline.config import (
    ALERT_SECRET_VARIABLES,
    ALWAYS,
    ENV_METADATA,
    PROJECT_ROOT,
    VARIABLES_READ_ELSEWHERE,
    WITH_USERINFO,
    WITH_USERINFO_OR_QUERY,
    ConfigError,
    EnvSetting,
    Settings,
    secret_variables,
    setting_variables,
)

VARIABLE = re.compile(r"\b(?:ENERGY|INFLUXDB|ALERT|DAGSTER)_[A-Z0-9_]*[A-Z0-9]\b")
# Not a setting of its own: the secret variables these settings took from the environment.
NOT_FROM_ONE_VARIABLE = {"env_secrets"}


def _configuration_table() -> dict[str, str]:
    """README "## Configuration" table: each variable named in a row's first cell, with that
    row's default cell."""
    readme = (PROJECT_ROOT / "README.md").read_text()
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        for variable in VARIABLE.findall(cells[0]):
            rows[variable] = cells[1]
    return rows


def _specs() -> dict[str, tuple[dataclasses.Field, EnvSetting]]:
    return {
        f.name: (f, spec)
        for f in dataclasses.fields(Settings)
        if isinstance(spec := f.metadata.get(ENV_METADATA), EnvSetting)
    }


def test_every_field_is_read_from_one_variable():
    fields = {f.name for f in dataclasses.fields(Settings)}
    assert fields - NOT_FROM_ONE_VARIABLE == set(_specs())
    variables = [spec.variable for _, spec in _specs().values()]
    assert len(variables) == len(set(variables))


def test_every_declared_variable_has_a_readme_row_and_every_row_a_reader():
    documented = set(_configuration_table())
    declared = set(setting_variables())
    assert declared - documented == set(), "declared in Settings, missing from the README table"
    assert documented - declared - set(VARIABLES_READ_ELSEWHERE) == set(), (
        "in the README table, read by nothing"
    )
    assert set(VARIABLES_READ_ELSEWHERE) <= documented


@pytest.mark.parametrize(("variable", "path"), sorted(VARIABLES_READ_ELSEWHERE.items()))
def test_variables_read_elsewhere_are_read_where_documented(variable, path):
    assert f'"{variable}"' in (PROJECT_ROOT / path).read_text()


def test_static_defaults_match_the_readme():
    rows = _configuration_table()
    for f, spec in _specs().values():
        if spec.derive is not None or f.default in ("", ()):
            continue
        shown = str(f.default).lower() if isinstance(f.default, bool) else str(f.default)
        if isinstance(f.default, type(PROJECT_ROOT)):
            shown = str(f.default.relative_to(PROJECT_ROOT))
        assert f"`{shown}`" in rows[spec.variable], (spec.variable, shown)


def test_every_variable_the_package_names_is_documented():
    """A variable read anywhere in the package, not only in Settings, needs its README row."""
    documented = set(_configuration_table())
    named: dict[str, str] = {}
    for path in (PROJECT_ROOT / "energy_pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for variable in VARIABLE.findall(node.value):
                    named.setdefault(variable, str(path.relative_to(PROJECT_ROOT)))
    for variable in re.findall(r"env:\s*(\w+)", (PROJECT_ROOT / "dagster.yaml").read_text()):
        named.setdefault(variable, "dagster.yaml")
    assert {v: p for v, p in named.items() if v not in documented} == {}


@pytest.mark.parametrize(
    "variable",
    sorted(spec.variable for f, spec in _specs().values() if isinstance(f.default, int)),
)
def test_every_number_and_switch_is_parsed_with_an_error_naming_it(variable):
    with pytest.raises(ConfigError, match=f"^{variable} must"):
        Settings.from_env({variable: "several"})


def test_derived_defaults_follow_the_settings_they_come_from(tmp_path):
    s = Settings.from_env(
        {"ENERGY_INFLUX_PORT": "1234", "ENERGY_PG_PORT": "2345", "ENERGY_DATA_DIR": str(tmp_path)}
    )
    assert s.influx_url == "http://127.0.0.1:1234"
    assert s.pg_dsn == "postgresql://postgres@127.0.0.1:2345/energy"
    assert s.dagster_pg_url == "postgresql+psycopg2://postgres@127.0.0.1:2345/dagster"
    assert s.reports_dir == tmp_path / "reports"
    explicit = Settings.from_env({"ENERGY_PG_PORT": "2345", "ENERGY_PG_DSN": "host=db"})
    assert explicit.pg_dsn == "host=db"


def test_secrecy_is_declared_with_each_setting():
    assert secret_variables() == {
        "INFLUXDB_URL": WITH_USERINFO,
        "INFLUXDB_TOKEN": ALWAYS,
        "INFLUXDB_USERNAME": ALWAYS,
        "INFLUXDB_PASSWORD": ALWAYS,
        "ENERGY_PG_DSN": ALWAYS,
        "ALERT_WEBHOOK_URL": WITH_USERINFO_OR_QUERY,
        "ALERT_WEBHOOK_SECRET": ALWAYS,
        "ALERT_SLACK_WEBHOOK_URL": ALWAYS,
        "ALERT_SMTP_PASSWORD": ALWAYS,
    }
    # The CLI scrubs these from what it prints: they must be the alert credentials declared.
    assert set(ALERT_SECRET_VARIABLES) == {
        v for v, rule in secret_variables().items() if v.startswith("ALERT_") and rule is ALWAYS
    }


@pytest.mark.parametrize(
    ("variable", "value", "secret"),
    [
        ("INFLUXDB_URL", "http://influx.example:8086", False),
        ("INFLUXDB_URL", "http://u:p@influx.example:8086", True),
        ("INFLUXDB_URL", "http://influx.example:8086/?db=energy", False),
        ("ALERT_WEBHOOK_URL", "https://hooks.example.org/e", False),
        ("ALERT_WEBHOOK_URL", "https://hooks.example.org/e?token=t", True),
        ("ALERT_WEBHOOK_URL", "https://u:p@hooks.example.org/e", True),
        ("ENERGY_PG_DSN", "postgresql://etl@db.example/energy", True),
        ("INFLUXDB_TOKEN", "t", True),
        ("INFLUXDB_DATABASE", "energy", False),
    ],
)
def test_a_value_from_the_environment_is_secret_by_its_declared_rule(variable, value, secret):
    env = {variable: value}
    if variable == "ALERT_WEBHOOK_URL":
        env["ALERT_WEBHOOK_SECRET"] = "s"
    assert (variable in Settings.from_env(env).env_secrets) is secret


def test_defaults_are_never_env_secrets():
    # The derived DSN and URL did not come from the environment: nothing to resolve at run time.
    assert Settings.from_env({}).env_secrets == frozenset()
