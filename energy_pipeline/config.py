"""Settings read from environment variables, with defaults for the local stack.

Every variable is listed in the README. Read once, by `definitions.py` and the CLI; nothing here is
evaluated at import time.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A setting is missing or malformed."""


def _int(
    env: Mapping[str, str], name: str, default: int, minimum: int = 0, maximum: int | None = None
) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from exc
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise ConfigError(f"{name} must be {bounds}, got {value}")
    return value


# URL userinfo (`scheme://user:secret@`), up to the last `@` of the token, since an unencoded `@` in
# a password is common; over-redacting is the safe direction.
_URL_USERINFO = re.compile(r"([a-z][a-z0-9+.-]*://[^:/@\s'\"]*):[^\s'\"]*@", re.IGNORECASE)
# `password=…` as a URL query parameter or a libpq key=value pair (quoted or bare); also catches
# `sslpassword=`.
_PASSWORD_PARAM = re.compile(r"(password\s*=\s*)('(?:\\.|[^'\\])*'?|[^\s&'\"]*)", re.IGNORECASE)
REDACTED = "***"


def redact_dsn(text: str) -> str:
    """`text` with every password of a URL, DSN query or key=value connection string masked."""
    text = _URL_USERINFO.sub(rf"\1:{REDACTED}@", text)
    return _PASSWORD_PARAM.sub(rf"\1{REDACTED}", text)


def dsn_secrets(dsn: str) -> set[str]:
    """The password(s) a connection string or URL carries, in every spelling an error could show."""
    found: set[str] = set()
    try:
        password = conninfo_to_dict(dsn).get("password")
        if password:
            found.add(str(password))
    except Exception:  # noqa: BLE001 - an unparsable DSN still gets the textual search below
        pass
    userinfo = urllib.parse.urlsplit(dsn).netloc.rpartition("@")[0] if "://" in dsn else ""
    if ":" in userinfo:
        found.add(userinfo.split(":", 1)[1])
    for m in _PASSWORD_PARAM.finditer(dsn):
        found.add(m.group(2).strip("'"))
    spellings = set()
    for secret in found:
        spellings |= {secret, urllib.parse.quote(secret, safe=""), urllib.parse.unquote(secret)}
    return {s for s in spellings if s}


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` with the given secrets (longest first) and any DSN password masked."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return redact_dsn(text)


def _check_port(name: str, port: object) -> None:
    for part in str(port).split(","):
        if part and not (part.isdigit() and 1 <= int(part) <= 65535):
            raise ConfigError(f"{name}: port must be between 1 and 65535")


def validate_http_url(name: str, url: str) -> str:
    """`url` if it is http(s)://host[:port][/path]; a ConfigError naming `name` otherwise."""
    parts = urllib.parse.urlsplit(url)
    shown = redact_dsn(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name} must look like http(s)://host[:port], got {shown!r}")
    try:
        parts.port  # noqa: B018 - raises on a non-numeric or out-of-range port
    except ValueError:
        raise ConfigError(f"{name}: port must be between 1 and 65535, got {shown!r}") from None
    return url


def validate_pg_dsn(name: str, dsn: str) -> str:
    """`dsn` if libpq can parse it (URL or key=value) with sane ports; never echoes it."""
    try:
        params = conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001 - libpq's message quotes the DSN, password included
        params = None
    if params is None:
        raise ConfigError(
            f"{name} is not a valid PostgreSQL connection string (postgresql://user:password@host"
            ":port/db or key=value pairs); characters such as % @ / : in a URL password must be "
            "percent-encoded (% as %25)"
        )
    _check_port(name, params.get("port", ""))
    return dsn


def validate_dagster_pg_url(name: str, url: str) -> str:
    """`url` if dagster-postgres can use it as is: `postgresql+psycopg2://`, parsable."""
    if not url.startswith("postgresql+psycopg2://"):
        raise ConfigError(
            f"{name} must start with postgresql+psycopg2:// (dagster.yaml hands it to "
            f"dagster-postgres as is, which needs psycopg2), got {redact_dsn(url)!r}"
        )
    validate_pg_dsn(name, "postgresql://" + url[len("postgresql+psycopg2://") :])
    return url


def dagster_storage_url(url: str) -> str:
    """Pin dagster-postgres to psycopg2: SQLAlchemy 2.1 maps plain `postgresql://` to psycopg 3,
    whose server-side parameters break dagster-postgres' `NOTIFY run_events, %s`."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix) :]
    return url


# Words a yes/no setting (or a yes/no field of a file the project reads) may be written as.
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if raw == "":
        return default
    if raw in TRUE_WORDS:
        return True
    if raw in FALSE_WORDS:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def validate_alert_channels(settings: Settings) -> None:
    """Each alert channel is either off or complete; errors name the variable, never a secret."""
    if settings.alert_webhook_url:
        validate_http_url("ALERT_WEBHOOK_URL", settings.alert_webhook_url)
        if not settings.secrets.get("ALERT_WEBHOOK_SECRET"):
            raise ConfigError("ALERT_WEBHOOK_URL is set: ALERT_WEBHOOK_SECRET must be set to sign")
    slack = urllib.parse.urlsplit(settings.secrets.get("ALERT_SLACK_WEBHOOK_URL", ""))
    if settings.secrets.get("ALERT_SLACK_WEBHOOK_URL") and not (
        slack.scheme in ("http", "https") and slack.hostname
    ):
        raise ConfigError("ALERT_SLACK_WEBHOOK_URL must be an http(s):// URL (value not shown)")
    if not settings.alert_smtp_host:
        return
    if not settings.alert_smtp_from or not settings.alert_smtp_to:
        raise ConfigError("ALERT_SMTP_HOST is set: ALERT_SMTP_FROM and ALERT_SMTP_TO must be too")
    for name, address in [("ALERT_SMTP_FROM", settings.alert_smtp_from)] + [
        ("ALERT_SMTP_TO", a) for a in settings.alert_smtp_to
    ]:
        if "@" not in address:
            raise ConfigError(f"{name} must hold email addresses, got {address!r}")
    if settings.alert_smtp_username and not settings.secrets.get("ALERT_SMTP_PASSWORD"):
        raise ConfigError("ALERT_SMTP_USERNAME is set: ALERT_SMTP_PASSWORD must be too")
    if settings.alert_smtp_username and not settings.alert_smtp_starttls:
        raise ConfigError(
            "ALERT_SMTP_USERNAME needs ALERT_SMTP_STARTTLS=true: AUTH would send the password "
            "in clear text"
        )


# Concurrent InfluxDB queries per read, each over a disjoint slice of the series (see influx.py).
READ_PARALLELISM = 2
# Longest a sensor-requested rollup run may stay started before run monitoring fails it and the
# sensor stops waiting for it: 20x a 60-minute catch-up run at peak (~40 s), see docs/design.md.
RUN_TIMEOUT_SECONDS = 900


# The alert channels' secrets: an incoming-webhook URL is its own credential.
ALERT_SECRET_VARIABLES = ("ALERT_WEBHOOK_SECRET", "ALERT_SLACK_WEBHOOK_URL", "ALERT_SMTP_PASSWORD")
SECRET_VARIABLES = (
    "INFLUXDB_URL",
    "INFLUXDB_TOKEN",
    "INFLUXDB_USERNAME",
    "INFLUXDB_PASSWORD",
    "ENERGY_PG_DSN",
    *ALERT_SECRET_VARIABLES,
)


@dataclass(frozen=True)
class Settings:
    """Everything the pipeline and the local stack need to know about their surroundings."""

    data_dir: Path
    influx_port: int
    pg_port: int
    influx_url: str
    influx_database: str
    influx_retention_policy: str
    influx_measurement: str
    pg_dsn: str
    dagster_pg_url: str
    raw_retention_days: int = 30
    settle_seconds: int = 3
    lateness_seconds: int = 7200
    late_audit_extra_seconds: int = 3600
    late_recent_seconds: int = 900
    late_full_scan_seconds: int = 2700
    max_range_minutes: int = 60
    chunk_minutes: int = 5
    read_parallelism: int = READ_PARALLELISM
    run_timeout_seconds: int = RUN_TIMEOUT_SECONDS
    webserver_url: str = "http://127.0.0.1:3000"
    # Retention horizons in days (0: kept forever); see energy_pipeline/retention/.
    retention_device_rollup_1m_days: int = 35
    retention_household_rollup_5m_days: int = 400
    retention_device_rollup_1h_days: int = 0
    retention_daily_report_days: int = 0
    retention_quarantine_days: int = 30
    retention_alerts_days: int = 400
    # Alert channels (secrets: ALERT_WEBHOOK_SECRET, ALERT_SLACK_WEBHOOK_URL, ALERT_SMTP_PASSWORD
    # in `secrets`); see energy_pipeline/alerts/channels.py.
    alert_webhook_url: str = ""
    alert_smtp_host: str = ""
    alert_smtp_port: int = 587
    alert_smtp_username: str = ""
    alert_smtp_from: str = ""
    alert_smtp_to: tuple[str, ...] = ()
    alert_smtp_starttls: bool = True
    # Rendered reports (fleet overviews, household pages); see energy_pipeline/reports/.
    reports_dir: Path = PROJECT_ROOT / ".data" / "reports"
    secrets: dict[str, str] = field(default_factory=dict, repr=False)
    # Variables holding a secret (a password may sit in a URL or DSN) that these settings took
    # from the environment: Dagster gets them as EnvVars, resolved at run time.
    env_secrets: frozenset[str] = frozenset()

    def __repr__(self) -> str:  # URLs and DSNs may carry passwords
        shown = ", ".join(
            f"{f}={redact_dsn(v) if isinstance(v, str) else v!r}"
            for f, v in vars(self).items()
            if f != "secrets"
        )
        return f"Settings({shown})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        data_dir = Path(env.get("ENERGY_DATA_DIR") or PROJECT_ROOT / ".data")
        influx_port = _int(env, "ENERGY_INFLUX_PORT", 18086, 1, 65535)
        pg_port = _int(env, "ENERGY_PG_PORT", 15432, 1, 65535)
        local_pg = f"postgresql://postgres@127.0.0.1:{pg_port}"
        settings = cls(
            data_dir=data_dir,
            influx_port=influx_port,
            pg_port=pg_port,
            influx_url=validate_http_url(
                "INFLUXDB_URL", env.get("INFLUXDB_URL") or f"http://127.0.0.1:{influx_port}"
            ),
            influx_database=env.get("INFLUXDB_DATABASE") or "energy",
            influx_retention_policy=env.get("INFLUXDB_RETENTION_POLICY") or "",
            influx_measurement=env.get("INFLUXDB_MEASUREMENT") or "telemetry",
            pg_dsn=validate_pg_dsn(
                "ENERGY_PG_DSN", env.get("ENERGY_PG_DSN") or f"{local_pg}/energy"
            ),
            # Not rewritten: the plain `dagster` CLI reads DAGSTER_PG_URL through dagster.yaml as
            # is, so every entry point must see a URL that works unchanged.
            dagster_pg_url=validate_dagster_pg_url(
                "DAGSTER_PG_URL",
                env.get("DAGSTER_PG_URL") or dagster_storage_url(f"{local_pg}/dagster"),
            ),
            raw_retention_days=_int(env, "ENERGY_RAW_RETENTION_DAYS", 30, 1),
            settle_seconds=_int(env, "ENERGY_SETTLE_SECONDS", 3),
            lateness_seconds=_int(env, "ENERGY_LATENESS_SECONDS", 7200),
            late_audit_extra_seconds=_int(env, "ENERGY_LATE_AUDIT_EXTRA_SECONDS", 3600),
            late_recent_seconds=_int(env, "ENERGY_LATE_RECENT_SECONDS", 900, 60),
            late_full_scan_seconds=_int(env, "ENERGY_LATE_FULL_SCAN_SECONDS", 2700),
            max_range_minutes=_int(env, "ENERGY_MAX_RANGE_MINUTES", 60, 1),
            chunk_minutes=_int(env, "ENERGY_CHUNK_MINUTES", 5, 1),
            read_parallelism=_int(env, "ENERGY_READ_PARALLELISM", READ_PARALLELISM, 1, 10),
            run_timeout_seconds=_int(env, "ENERGY_RUN_TIMEOUT_SECONDS", RUN_TIMEOUT_SECONDS, 10),
            webserver_url=validate_http_url(
                "DAGSTER_WEBSERVER_URL", env.get("DAGSTER_WEBSERVER_URL") or "http://127.0.0.1:3000"
            ),
            retention_device_rollup_1m_days=_int(env, "ENERGY_RETENTION_DEVICE_ROLLUP_1M_DAYS", 35),
            retention_household_rollup_5m_days=_int(
                env, "ENERGY_RETENTION_HOUSEHOLD_ROLLUP_5M_DAYS", 400
            ),
            retention_device_rollup_1h_days=_int(env, "ENERGY_RETENTION_DEVICE_ROLLUP_1H_DAYS", 0),
            retention_daily_report_days=_int(env, "ENERGY_RETENTION_DAILY_REPORT_DAYS", 0),
            retention_quarantine_days=_int(env, "ENERGY_RETENTION_QUARANTINE_DAYS", 30),
            retention_alerts_days=_int(env, "ENERGY_RETENTION_ALERTS_DAYS", 400),
            alert_webhook_url=env.get("ALERT_WEBHOOK_URL") or "",
            alert_smtp_host=env.get("ALERT_SMTP_HOST") or "",
            alert_smtp_port=_int(env, "ALERT_SMTP_PORT", 587, 1, 65535),
            alert_smtp_username=env.get("ALERT_SMTP_USERNAME") or "",
            alert_smtp_from=env.get("ALERT_SMTP_FROM") or "",
            alert_smtp_to=tuple(
                a.strip() for a in env.get("ALERT_SMTP_TO", "").split(",") if a.strip()
            ),
            alert_smtp_starttls=_bool(env, "ALERT_SMTP_STARTTLS", True),
            reports_dir=Path(env.get("ENERGY_REPORTS_DIR") or data_dir / "reports"),
            secrets={
                k: env[k]
                for k in (
                    "INFLUXDB_TOKEN",
                    "INFLUXDB_USERNAME",
                    "INFLUXDB_PASSWORD",
                    *ALERT_SECRET_VARIABLES,
                )
                if env.get(k)
            },
            # A URL is a secret only when it carries userinfo.
            env_secrets=frozenset(
                k for k in SECRET_VARIABLES if env.get(k) and (k != "INFLUXDB_URL" or "@" in env[k])
            )
            # A webhook URL carrying userinfo or a query string (often a token) is one too.
            | (
                {"ALERT_WEBHOOK_URL"}
                if {"@", "?"} & set(env.get("ALERT_WEBHOOK_URL") or "")
                else frozenset()
            ),
        )
        if settings.raw_retention_days * 1440 > 95_000:
            raise ConfigError(
                "ENERGY_RAW_RETENTION_DAYS above 65 would exceed Dagster's advised 100,000 minute "
                "partitions per asset"
            )
        from energy_pipeline.retention import validate_horizons

        validate_horizons(settings)
        validate_alert_channels(settings)
        return settings
