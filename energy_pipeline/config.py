"""Settings read from environment variables, with defaults for the local stack.

Every variable is listed in the README (a test holds the two together). Read once, by
`definitions.py` and the CLI; nothing here is evaluated at import time.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from psycopg.conninfo import conninfo_to_dict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A setting is missing or malformed."""


def _parse_int(minimum: int, maximum: int | None) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError as exc:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from exc
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise ConfigError(f"{name} must be {bounds}, got {value}")
        return value

    return parse


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


def _parse_bool(name: str, raw: str) -> bool:
    word = raw.lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ConfigError(f"{name} must be true or false, got {word!r}")


def _parse_list(name: str, raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def validate_alert_channels(settings: Settings) -> None:
    """Each alert channel is either off or complete; errors name the variable, never a secret."""
    if settings.alert_webhook_url:
        validate_http_url("ALERT_WEBHOOK_URL", settings.alert_webhook_url)
        if not settings.alert_webhook_secret:
            raise ConfigError("ALERT_WEBHOOK_URL is set: ALERT_WEBHOOK_SECRET must be set to sign")
    slack = urllib.parse.urlsplit(settings.alert_slack_webhook_url)
    if settings.alert_slack_webhook_url and not (
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
    if settings.alert_smtp_username and not settings.alert_smtp_password:
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


# The alert channels' credentials (an incoming-webhook URL is its own), which the CLI scrubs from
# what it prints; a test holds them to the `secret=ALWAYS` declarations of the alert settings.
ALERT_SECRET_VARIABLES = ("ALERT_WEBHOOK_SECRET", "ALERT_SLACK_WEBHOOK_URL", "ALERT_SMTP_PASSWORD")
# Documented variables that `Settings` does not read, and the file that does.
VARIABLES_READ_ELSEWHERE = {
    "DAGSTER_HOME": "energy_pipeline/cli.py",  # and Dagster itself
    "ENERGY_SENSOR_LOOP_SECONDS": "energy_pipeline/daemon.py",  # before Dagster loads the code
}

# The dataclass field metadata key of a field's EnvSetting.
ENV_METADATA = "energy_pipeline.env"


def _mask_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{REDACTED}@{host}" if "@" in parts.netloc else host
    query = REDACTED if parts.query else ""
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query, fragment=""))


@dataclass(frozen=True)
class SecretWhen:
    """When a setting's value is a secret: then, taken from the environment, it reaches Dagster
    as an `EnvVar` of its variable (resolved at run time, never shown), and `repr` masks it."""

    name: str
    holds_secret: Callable[[str], bool]
    # The value as `repr(Settings)` shows it while it holds a secret.
    masked: Callable[[str], str]

    def __repr__(self) -> str:
        return self.name


# A credential, or a connection string whose password may hide in any of libpq's spellings.
ALWAYS = SecretWhen("ALWAYS", lambda value: True, lambda value: REDACTED)
# A URL whose userinfo (`user:password@`) is the credential; without one it is a plain address.
WITH_USERINFO = SecretWhen("WITH_USERINFO", lambda value: "@" in value, _mask_url)
# A URL whose query string often carries a token, as webhook URLs do.
WITH_USERINFO_OR_QUERY = SecretWhen(
    "WITH_USERINFO_OR_QUERY", lambda value: "@" in value or "?" in value, _mask_url
)


@dataclass(frozen=True)
class EnvSetting:
    """How one `Settings` field is read: its variable, the parser of its text (which raises a
    ConfigError naming the variable), for a default built from other settings `derive`, and
    when its value is a secret (`secret`; None: never)."""

    variable: str
    parse: Callable[[str, str], Any]
    derive: Callable[[Mapping[str, Any]], Any] | None = None
    # Leading and trailing blanks are ignored (a blank value then means unset).
    strip: bool = False
    secret: SecretWhen | None = None

    def is_secret(self, value: object) -> bool:
        """Whether `value` of this setting is a secret by its declaration."""
        return (
            self.secret is not None
            and isinstance(value, str)
            and bool(value)
            and self.secret.holds_secret(value)
        )


def _declare(spec: EnvSetting, default: Any) -> Any:
    if spec.derive is not None:
        return field(metadata={ENV_METADATA: spec})
    return field(default=default, metadata={ENV_METADATA: spec})


def env_int(variable: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    """A `Settings` field read from `variable` as an integer within [minimum, maximum]."""
    return _declare(EnvSetting(variable, _parse_int(minimum, maximum)), default)


def env_str(
    variable: str,
    default: str = "",
    *,
    derive: Callable[[Mapping[str, Any]], str] | None = None,
    validate: Callable[[str, str], str] | None = None,
    secret: SecretWhen | None = None,
) -> str:
    """A `Settings` field read from `variable` as text, checked by `validate(variable, text)`; its
    default is `default`, or `derive(settings read so far)` (checked the same way). `secret` says
    when its value is a secret (see `SecretWhen`)."""
    return _declare(EnvSetting(variable, validate or _keep, derive, secret=secret), default)


def env_secret(variable: str) -> str:
    """A `Settings` field holding a credential read from `variable`; empty (unset) by default."""
    return env_str(variable, secret=ALWAYS)


def env_bool(variable: str, default: bool) -> bool:
    """A `Settings` field read from `variable` as a yes/no word (`TRUE_WORDS`, `FALSE_WORDS`)."""
    return _declare(EnvSetting(variable, _parse_bool, strip=True), default)


def env_list(variable: str) -> tuple[str, ...]:
    """A `Settings` field read from `variable` as comma-separated items; empty by default."""
    return _declare(EnvSetting(variable, _parse_list), ())


def env_path(
    variable: str,
    default: Path | None = None,
    *,
    derive: Callable[[Mapping[str, Any]], Path] | None = None,
) -> Path:
    """A `Settings` field read from `variable` as a path: `default`, or `derive(settings so far)`
    when unset."""
    return _declare(EnvSetting(variable, lambda _, raw: Path(raw), derive), default)


def _keep(name: str, raw: str) -> str:
    return raw


def _local_pg(settings: Mapping[str, Any], database: str) -> str:
    return f"postgresql://postgres@127.0.0.1:{settings['pg_port']}/{database}"


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the pipeline and the local stack need to know about their surroundings.

    Each field is declared once, with its variable, default and parser; `from_env` reads them in
    this order, so a derived default sees the fields above it.
    """

    data_dir: Path = env_path("ENERGY_DATA_DIR", PROJECT_ROOT / ".data")
    influx_port: int = env_int("ENERGY_INFLUX_PORT", 18086, 1, 65535)
    pg_port: int = env_int("ENERGY_PG_PORT", 15432, 1, 65535)
    # The `influx_*` fields configure `InfluxDBResource` (its `url`, `token`, ...).
    influx_url: str = env_str(
        "INFLUXDB_URL",
        derive=lambda s: f"http://127.0.0.1:{s['influx_port']}",
        validate=validate_http_url,
        secret=WITH_USERINFO,
    )
    influx_database: str = env_str("INFLUXDB_DATABASE", "energy")
    influx_retention_policy: str = env_str("INFLUXDB_RETENTION_POLICY", "")
    influx_measurement: str = env_str("INFLUXDB_MEASUREMENT", "telemetry")
    influx_token: str = env_secret("INFLUXDB_TOKEN")
    influx_username: str = env_secret("INFLUXDB_USERNAME")
    influx_password: str = env_secret("INFLUXDB_PASSWORD")
    # `PostgresResource.dsn`.
    pg_dsn: str = env_str(
        "ENERGY_PG_DSN",
        derive=lambda s: _local_pg(s, "energy"),
        validate=validate_pg_dsn,
        secret=ALWAYS,
    )
    # Not rewritten: the plain `dagster` CLI reads DAGSTER_PG_URL through dagster.yaml as is, so
    # every entry point must see a URL that works unchanged.
    dagster_pg_url: str = env_str(
        "DAGSTER_PG_URL",
        derive=lambda s: dagster_storage_url(_local_pg(s, "dagster")),
        validate=validate_dagster_pg_url,
    )
    raw_retention_days: int = env_int("ENERGY_RAW_RETENTION_DAYS", 30, 1)
    settle_seconds: int = env_int("ENERGY_SETTLE_SECONDS", 3)
    lateness_seconds: int = env_int("ENERGY_LATENESS_SECONDS", 7200)
    late_audit_extra_seconds: int = env_int("ENERGY_LATE_AUDIT_EXTRA_SECONDS", 3600)
    late_recent_seconds: int = env_int("ENERGY_LATE_RECENT_SECONDS", 900, 60)
    late_full_scan_seconds: int = env_int("ENERGY_LATE_FULL_SCAN_SECONDS", 2700)
    max_range_minutes: int = env_int("ENERGY_MAX_RANGE_MINUTES", 60, 1)
    chunk_minutes: int = env_int("ENERGY_CHUNK_MINUTES", 5, 1)
    read_parallelism: int = env_int("ENERGY_READ_PARALLELISM", READ_PARALLELISM, 1, 10)
    unread_fields: tuple[str, ...] = env_list("ENERGY_UNREAD_FIELDS")
    run_timeout_seconds: int = env_int("ENERGY_RUN_TIMEOUT_SECONDS", RUN_TIMEOUT_SECONDS, 10)
    webserver_url: str = env_str(
        "DAGSTER_WEBSERVER_URL", "http://127.0.0.1:3000", validate=validate_http_url
    )
    # Retention horizons in days (0: kept forever); see energy_pipeline/retention/.
    retention_device_rollup_1m_days: int = env_int("ENERGY_RETENTION_DEVICE_ROLLUP_1M_DAYS", 35)
    retention_household_rollup_5m_days: int = env_int(
        "ENERGY_RETENTION_HOUSEHOLD_ROLLUP_5M_DAYS", 400
    )
    retention_device_rollup_1h_days: int = env_int("ENERGY_RETENTION_DEVICE_ROLLUP_1H_DAYS", 0)
    retention_daily_report_days: int = env_int("ENERGY_RETENTION_DAILY_REPORT_DAYS", 0)
    retention_quarantine_days: int = env_int("ENERGY_RETENTION_QUARANTINE_DAYS", 30)
    retention_alerts_days: int = env_int("ENERGY_RETENTION_ALERTS_DAYS", 400)
    # The `alert_*` fields configure `AlertChannelsResource` (see energy_pipeline/alerts/).
    alert_webhook_url: str = env_str("ALERT_WEBHOOK_URL", secret=WITH_USERINFO_OR_QUERY)
    alert_webhook_secret: str = env_secret("ALERT_WEBHOOK_SECRET")
    alert_slack_webhook_url: str = env_secret("ALERT_SLACK_WEBHOOK_URL")
    alert_smtp_host: str = env_str("ALERT_SMTP_HOST")
    alert_smtp_port: int = env_int("ALERT_SMTP_PORT", 587, 1, 65535)
    alert_smtp_username: str = env_str("ALERT_SMTP_USERNAME")
    alert_smtp_password: str = env_secret("ALERT_SMTP_PASSWORD")
    alert_smtp_from: str = env_str("ALERT_SMTP_FROM")
    alert_smtp_to: tuple[str, ...] = env_list("ALERT_SMTP_TO")
    alert_smtp_starttls: bool = env_bool("ALERT_SMTP_STARTTLS", True)
    # Rendered reports (fleet overviews, household pages); see energy_pipeline/reports/.
    reports_dir: Path = env_path("ENERGY_REPORTS_DIR", derive=lambda s: s["data_dir"] / "reports")
    # Variables whose value these settings took from the environment and that hold a secret by
    # their declaration: Dagster gets them as EnvVars, resolved at run time.
    env_secrets: frozenset[str] = frozenset()

    def __repr__(self) -> str:  # credentials, and URLs and DSNs that may carry passwords
        specs = _env_settings()

        def shown(name: str, value: object) -> str:
            spec = specs.get(name)
            if spec is not None and spec.secret is not None and spec.is_secret(value):
                return repr(spec.secret.masked(str(value)))
            return repr(redact_dsn(value) if isinstance(value, str) else value)

        return f"Settings({', '.join(f'{f}={shown(f, v)}' for f, v in vars(self).items())})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        env_secrets: set[str] = set()
        for f in fields(cls):
            spec = f.metadata.get(ENV_METADATA)
            if spec is None:
                continue
            raw = env.get(spec.variable) or ""
            raw = raw.strip() if spec.strip else raw
            if raw:
                values[f.name] = spec.parse(spec.variable, raw)
                if spec.is_secret(raw):
                    env_secrets.add(spec.variable)
            elif spec.derive is not None:
                values[f.name] = spec.parse(spec.variable, spec.derive(values))
            else:
                values[f.name] = f.default
        settings = cls(**values, env_secrets=frozenset(env_secrets))
        if settings.raw_retention_days * 1440 > 95_000:
            raise ConfigError(
                "ENERGY_RAW_RETENTION_DAYS above 65 would exceed Dagster's advised 100,000 minute "
                "partitions per asset"
            )
        from energy_pipeline.retention import validate_horizons

        validate_horizons(settings)
        validate_alert_channels(settings)
        return settings


def _env_settings() -> dict[str, EnvSetting]:
    """Each `Settings` field read from the environment, by field name, in declaration order."""
    return {
        f.name: f.metadata[ENV_METADATA] for f in fields(Settings) if ENV_METADATA in f.metadata
    }


def env_setting(name: str) -> EnvSetting | None:
    """How the `Settings` field `name` is read from the environment; None if it is not."""
    return _env_settings().get(name)


def setting_variables() -> dict[str, str]:
    """Every environment variable `Settings.from_env` reads, with the field that holds it."""
    return {spec.variable: name for name, spec in _env_settings().items()}


def secret_variables() -> dict[str, SecretWhen]:
    """Every variable whose value may be a secret, with the rule that says when it is."""
    return {
        spec.variable: spec.secret for spec in _env_settings().values() if spec.secret is not None
    }
