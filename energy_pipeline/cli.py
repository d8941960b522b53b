"""`energy-pipeline` command line: local services, migrations, the simulator and the live stack."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import sys
import traceback
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from energy_pipeline.config import (
    ALERT_SECRET_VARIABLES,
    PROJECT_ROOT,
    ConfigError,
    Settings,
    dsn_secrets,
    scrub,
)
from energy_pipeline.influx import InfluxClient, InfluxError
from energy_pipeline.storage import StorageError, connect, redact_dsn

if TYPE_CHECKING:
    from energy_pipeline.devtools.services import LocalInflux, LocalPostgres

# The production image leaves out energy_pipeline.devtools (simulator, local servers, bench): the
# commands that need it import it when they run, after checking it is there.
DEVTOOLS = "energy_pipeline.devtools"


class DevToolsMissing(Exception):
    """A development command was run where the development tools are not installed."""


def _require_devtools(command: str) -> None:
    if importlib.util.find_spec(DEVTOOLS) is None:
        raise DevToolsMissing(
            f"`{command}` needs the development tools ({DEVTOOLS}: simulator, local servers, "
            "bench), not installed in this image; use the development image (docker build "
            "--target dev) or an install from a checkout of the repository"
        )


def _servers(settings: Settings) -> tuple[LocalInflux, LocalPostgres]:
    from energy_pipeline.devtools.services import LocalInflux, LocalPostgres

    return (
        LocalInflux(settings.data_dir / "influxdb", settings.influx_port),
        LocalPostgres(settings.data_dir / "postgres", settings.pg_port),
    )


def _influx(settings: Settings) -> InfluxClient:
    return InfluxClient(
        settings.influx_url,
        settings.influx_database,
        retention_policy=settings.influx_retention_policy,
        username=settings.influx_username or None,
        password=settings.influx_password or None,
        token=settings.influx_token or None,
    )


def services_up(settings: Settings) -> None:
    """Start local InfluxDB and PostgreSQL, create databases and migrate the schema."""
    from energy_pipeline.migrations import upgrade

    influx, pg = _servers(settings)
    influx.start()
    print(f"InfluxDB   {influx.url} (data {influx.root})")
    pg.start()
    print(f"PostgreSQL {redact_dsn(pg.dsn())} (data {pg.root})")
    client = _influx(settings)
    client.create_database()
    print(f"InfluxDB   {_influx_retention(settings, client)}")
    pg.create_database("energy")
    pg.create_database("dagster", private=True)
    upgrade(settings.pg_dsn)
    print(f"schema 'energy' migrated in {redact_dsn(settings.pg_dsn)}")


def cmd_services(args: argparse.Namespace, settings: Settings) -> int:
    influx, pg = _servers(settings)
    if args.action == "up":
        services_up(settings)
    elif args.action == "down":
        pg.stop()
        influx.stop()
        print("stopped")
    else:
        for name, server in (("InfluxDB", influx), ("PostgreSQL", pg)):
            state = "running" if server.running() else "stopped"
            print(f"{name:<11} {state:<8} port {server.port}  data {server.root}")
    return 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from energy_pipeline.migrations import upgrade

    upgrade(settings.pg_dsn)
    print(f"schema 'energy' is at the newest revision in {redact_dsn(settings.pg_dsn)}")
    return 0


def _create_pg_database(dsn: str, *, private: bool = False) -> str:
    """Create the database `dsn` names if it is missing and the user may; says what happened.

    `private`: a database created here is for its owner alone (CONNECT taken from PUBLIC, which
    PostgreSQL grants it on every new database), so other logins, BI's included, cannot even list
    its tables; superusers and the owner still connect. An existing database is left as it is.
    """
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(dsn)
    name = str(params.get("dbname") or params.get("user") or "")
    shown = redact_dsn(dsn)
    for maintenance in ("postgres", "template1"):
        try:
            conn = connect(make_conninfo(dsn, dbname=maintenance))
            break
        except StorageError:
            continue
    else:
        return f"database {name!r}: not checked (cannot connect to a maintenance database)"
    with conn:
        found = conn.execute(
            "SELECT has_database_privilege('public', datname, 'CONNECT') FROM pg_database "
            "WHERE datname = %s",
            (name,),
        ).fetchone()
        if found:
            open_to_all = (
                " and any login may connect (see README, BI)" if private and found[0] else ""
            )
            return f"database {name!r}: exists{open_to_all} ({shown})"
        row = conn.execute(
            "SELECT rolsuper OR rolcreatedb FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        if not (row and row[0]):
            return (
                f"database {name!r}: skipped, {params.get('user', 'this user')!r} lacks CREATEDB; "
                f"ask an administrator to run CREATE DATABASE {name} OWNER <owner login>"
            )
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.errors.DuplicateDatabase:
            return f"database {name!r}: exists ({shown})"
        if private:
            conn.execute(
                sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(sql.Identifier(name))
            )
            return f"database {name!r}: created, for its owner only ({shown})"
    return f"database {name!r}: created ({shown})"


def _influx_retention(settings: Settings, influx: InfluxClient) -> str:
    """Give the local server's raw data ENERGY_RAW_RETENTION_DAYS of retention."""
    from energy_pipeline.influx import quote_ident

    local = f"http://127.0.0.1:{settings.influx_port}"
    if settings.influx_url.rstrip("/") != local:
        return "retention policy: left as it is (not the local server)"
    db = quote_ident(influx.database)
    rp = settings.influx_retention_policy
    if not rp:
        for result in influx.query_json(f"SHOW RETENTION POLICIES ON {db}"):
            for series in result.get("series", []):
                cols = series["columns"]
                rp = next(
                    (r[cols.index("name")] for r in series["values"] if r[cols.index("default")]),
                    "",
                )
    days = settings.raw_retention_days
    # Altering the default policy keeps existing points readable (a new policy would hide them).
    influx.query_json(
        f"ALTER RETENTION POLICY {quote_ident(rp)} ON {db} DURATION {days}d SHARD DURATION 1d"
    )
    return f"retention policy {rp!r}: {days} days"


def cmd_init(args: argparse.Namespace, settings: Settings) -> int:
    """Databases (if permitted), migrations with roles, DAGSTER_HOME; safe to run again."""
    from energy_pipeline.migrations import upgrade

    influx = _influx(settings)
    influx.create_database()
    print(f"InfluxDB {influx.url}: database {influx.database!r} ready")
    print(f"InfluxDB {_influx_retention(settings, influx)}")
    dagster_dsn = "postgresql://" + settings.dagster_pg_url.split("://", 1)[1]
    print(f"PostgreSQL {_create_pg_database(settings.pg_dsn)}")
    print(f"PostgreSQL {_create_pg_database(dagster_dsn, private=True)}")
    upgrade(settings.pg_dsn)
    print("PostgreSQL schema 'energy' at the newest revision, roles in place")
    home = Path(os.environ.get("DAGSTER_HOME") or settings.data_dir / "dagster_home")
    home.mkdir(parents=True, exist_ok=True)
    target, source = home / "dagster.yaml", PROJECT_ROOT / "dagster.yaml"
    if not target.exists():
        shutil.copy(source, target)
        print(f"DAGSTER_HOME {home}: dagster.yaml written")
    elif target.read_bytes() == source.read_bytes():
        print(f"DAGSTER_HOME {home}: dagster.yaml up to date")
    else:
        print(f"DAGSTER_HOME {home}: dagster.yaml differs from the project's, kept as it is")
    print(
        "\nFor the dagster CLI (dagster dev, dagster-daemon, dagster-webserver):\n"
        f"  export DAGSTER_HOME={home}\n"
        f"  export DAGSTER_PG_URL='{redact_dsn(settings.dagster_pg_url)}'"
        + ("   # *** = the password" if "***" in redact_dsn(settings.dagster_pg_url) else "")
    )
    return 0


def cmd_simulate(args: argparse.Namespace, settings: Settings) -> int:
    from energy_pipeline.devtools.telemetry_writer import SimulationOptions, run_history, run_live

    options = SimulationOptions(
        devices=args.devices,
        seed=args.seed,
        faults=tuple(f for f in (args.faults or "").split(",") if f),
        fault_rate=args.fault_rate,
        hostile_ids=args.hostile,
        register=not args.no_register,
    )
    influx = _influx(settings)
    influx.create_database()
    if args.minutes:
        end = datetime.now(UTC).replace(second=0, microsecond=0)
        run_history(influx, settings, options, end - timedelta(minutes=args.minutes), end)
    else:
        run_live(influx, settings, options, duration_s=args.duration)
    return 0


def cmd_live(args: argparse.Namespace, settings: Settings) -> int:
    """Services, simulator, Dagster webserver and daemon, kept running until Ctrl-C or SIGTERM."""
    from energy_pipeline.devtools import dagster_stack
    from energy_pipeline.devtools.supervisor import ChildSpec, Supervisor

    services_up(settings)
    home = dagster_stack.dagster_home(settings.data_dir / "dagster_home")
    # The daemon's partition window sensor reloads the code location in this webserver.
    webserver = {"DAGSTER_WEBSERVER_URL": f"http://127.0.0.1:{args.port}"}
    env = dagster_stack.dagster_env(home, settings.dagster_pg_url, webserver)
    bin_dir = Path(sys.executable).parent
    logs = settings.data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    commands = {
        "simulator": [str(bin_dir / "energy-pipeline"), "simulate", "--devices", str(args.devices)]
        + (["--faults", args.faults] if args.faults else []),
        # dagster-daemon with one-second sensor loops and outage-throttled logging (daemon.py).
        "daemon": dagster_stack.daemon_command(),
        "webserver": dagster_stack.webserver_command(args.port),
    }
    supervisor = Supervisor(
        [
            ChildSpec(name, command, logs / f"{name}.log", env, PROJECT_ROOT)
            for name, command in commands.items()
        ],
        say=lambda message: print(message, flush=True),
    )
    print(
        f"\nDagster UI: http://127.0.0.1:{args.port}  (sensors start by themselves)\n"
        f"Rollups:    psql '{redact_dsn(settings.pg_dsn)}' -c "
        "'SELECT * FROM energy.device_rollup_1m ORDER BY bucket DESC LIMIT 10'\n"
        "A child that exits is restarted (with backoff); Ctrl-C stops the simulator, webserver "
        "and daemon (servers keep running; `energy-pipeline services down` stops them).\n",
        flush=True,
    )
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    supervisor.run(duration_s=args.duration)
    return 0


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    """Start or reuse the local servers and run the benchmark in dedicated databases."""
    import json
    from dataclasses import replace

    from energy_pipeline.devtools.bench import BenchOptions, BenchTargets, format_table, run_bench

    opts = BenchOptions.quick() if args.quick else BenchOptions()
    names = ("devices", "minutes", "long_minutes", "readers", "read_seconds", "read_hours",
             "read_households", "writer_pace_s", "seed")  # fmt: skip
    overrides = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    opts = replace(opts, **overrides)
    services_up(settings)
    influx, pg = _servers(settings)
    pg.create_database("energy_bench")
    pg.create_database("energy_bench_live")
    pg.create_database("energy_bench_dagster")
    targets = BenchTargets(
        influx_url=settings.influx_url,
        influx_database="energy_bench",
        pg_dsn=pg.dsn("energy_bench"),
        influx_auth={
            variable: value
            for variable, value in (
                ("INFLUXDB_USERNAME", settings.influx_username),
                ("INFLUXDB_PASSWORD", settings.influx_password),
                ("INFLUXDB_TOKEN", settings.influx_token),
            )
            if value
        },
        influx_pid=influx.pid,
    )
    result = run_bench(
        targets,
        opts,
        lambda m: print(m, flush=True),
        live_minutes=args.live_minutes,
        live_dsns=(pg.dsn("energy_bench_live"), pg.dsn("energy_bench_dagster")),
        live_only=args.live_only,
        live_alerts=args.live_alerts,
        reads_only=args.reads_only,
    )
    print()
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
        print(f"\nfigures written to {args.json}")
    return 0


def _shown(value: str) -> str:
    """A tag value as printed: quoted when spaces or control characters would hide its edges."""
    return (
        repr(value) if not value.isprintable() or value != value.strip() or " " in value else value
    )


def cmd_devices(args: argparse.Namespace, settings: Settings) -> int:
    """Device registry: import a CSV, or list (and register) devices InfluxDB has seen."""
    from energy_pipeline.registry import (
        RegistryError,
        discover,
        import_device_file,
        parse_duration,
        register_discovered,
    )

    if args.action == "import":
        path = Path(args.file)
        if not path.is_file():
            print(f"energy-pipeline: {path}: no such file", file=sys.stderr)
            return 2
        try:
            with connect(settings.pg_dsn) as conn:
                result = import_device_file(conn, path)
        except RegistryError as exc:
            print(f"energy-pipeline: {path} was not imported (nothing written):", file=sys.stderr)
            for problem in exc.problems:
                print(f"  {path}: {problem}", file=sys.stderr)
            return 2
        print(
            f"{path}: {result.added} devices added, {result.updated} updated, "
            f"{result.unchanged} unchanged"
        )
        return 0

    try:
        window = parse_duration(args.since)
    except ValueError as exc:
        print(f"energy-pipeline: --since: {exc}", file=sys.stderr)
        return 2
    since = datetime.now(UTC) - window
    with connect(settings.pg_dsn) as conn:
        found = discover(conn, _influx(settings), settings.influx_measurement, since)
        if args.register:
            register_discovered(conn, found)
    print(
        f"InfluxDB {settings.influx_url} database {settings.influx_database!r}, measurement "
        f"{settings.influx_measurement!r}, points since {since:%Y-%m-%d %H:%M:%S}Z ({args.since})"
    )
    print(f"\nunregistered devices: {found.unknown.height}")
    for device, household, points in found.unknown.iter_rows():
        print(f"  {_shown(device)}  household {_shown(household)}  {points} points")
    if found.ambiguous.height:
        print(
            f"\nunregistered, seen with several households (not registered by --register; "
            f"import them from a CSV): {found.ambiguous.height}"
        )
        for device, households, points in found.ambiguous.iter_rows():
            print(
                f"  {_shown(device)}  households {', '.join(map(_shown, households))}  "
                f"{points} points"
            )
    print(
        f"\nregistered devices whose tag household differs from the registry: "
        f"{found.mismatched.height} (the registered household is used)"
    )
    for device, registered, tagged, points in found.mismatched.iter_rows():
        print(
            f"  {_shown(device)}  registered {_shown(registered)}  tagged {_shown(tagged)}  "
            f"{points} points"
        )
    if found.unregistrable.height:
        print(
            f"\ntag pairs no registry row can match (empty, NUL or invalid UTF-8; their points "
            f"are quarantined): {found.unregistrable.height}"
        )
    if args.register:
        print(f"\nregistered {len(found.registered)} devices with their tag household")
    elif found.unknown.height:
        print("\nrun again with --register to register them with their tag household")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="energy-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "services",
        help="install-free control of the local InfluxDB/PostgreSQL (development tools)",
    )
    p.add_argument("action", choices=["up", "down", "status"])
    p.set_defaults(func=cmd_services, needs_devtools=True)

    p = sub.add_parser("migrate", help="apply schema migrations to ENERGY_PG_DSN")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser(
        "init", help="set up existing servers: databases, migrations and roles, DAGSTER_HOME"
    )
    p.set_defaults(func=cmd_init)

    p = sub.add_parser(
        "simulate", help="write simulated device telemetry to InfluxDB (development tools)"
    )
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--minutes", type=int, default=0, help="write N minutes of history and exit")
    p.add_argument("--duration", type=float, default=0, help="live: stop after N seconds")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--faults",
        default="",
        help="comma-separated: duplicate,out_of_order,late,"
        "missing_field,negative,absurd,unknown_device",
    )
    p.add_argument("--fault-rate", type=float, default=0.01)
    p.add_argument("--hostile", action="store_true", help="include hostile tag values")
    p.add_argument("--no-register", action="store_true", help="do not register devices in PG")
    p.set_defaults(func=cmd_simulate, needs_devtools=True)

    p = sub.add_parser(
        "bench",
        help="measure the minute path against InfluxDB and raw PostgreSQL (development tools)",
    )
    p.add_argument("--quick", action="store_true", help="500 devices, 3 minutes, short reads")
    p.add_argument("--devices", type=int)
    p.add_argument("--minutes", type=int, help="single-minute runs to measure (default 10)")
    p.add_argument("--long-minutes", type=int, help="ranged-run length, 0 skips (default 60)")
    p.add_argument("--readers", type=int)
    p.add_argument("--read-seconds", type=float)
    p.add_argument("--read-hours", type=int, help="BI read window in hours (24; quick: 1)")
    p.add_argument("--read-households", type=int, help="households read (20; quick: 2)")
    p.add_argument(
        "--writer-pace",
        type=float,
        dest="writer_pace_s",
        help="while the readers run, rewrite one minute of the fleet every this many seconds "
        "(60: the live pipeline at peak; default 0: back to back)",
    )
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--live-minutes",
        type=float,
        default=0,
        help="also run simulator + daemon live this long (freshness, run overhead)",
    )
    p.add_argument(
        "--live-only", action="store_true", help="only the live section (needs --live-minutes)"
    )
    p.add_argument(
        "--reads-only",
        action="store_true",
        help="load --minutes of history and measure only the BI readers (with capacity and CPU)",
    )
    p.add_argument(
        "--live-alerts",
        action="store_true",
        help="live section with 100 alert rules and a webhook receiver (latency, retries)",
    )
    p.add_argument("--json", help="also write the figures as JSON to this path")
    p.set_defaults(func=cmd_bench, needs_devtools=True)

    p = sub.add_parser(
        "live", help="services + simulator + Dagster webserver and daemon (development tools)"
    )
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--faults", default="")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--duration", type=float, default=0, help="stop after N seconds (0: Ctrl-C)")
    p.set_defaults(func=cmd_live, needs_devtools=True)

    p = sub.add_parser("devices", help="device registry: import a CSV, discover InfluxDB's devices")
    dev = p.add_subparsers(dest="action", required=True)
    d = dev.add_parser("import", help="upsert devices from a CSV (header required)")
    d.add_argument(
        "file", help="CSV: device_id,household_id[,name,model,location,timezone,profile]"
    )
    d = dev.add_parser("discover", help="list device/household tags InfluxDB saw, not registered")
    d.add_argument(
        "--since", default="24h", help="how far back to look (30m, 24h, 7d; default 24h)"
    )
    d.add_argument("--register", action="store_true", help="register the unknown devices")
    p.set_defaults(func=cmd_devices)

    from energy_pipeline.retention_cli import add_retention_parser

    add_retention_parser(sub)
    from energy_pipeline.alerts.cli import add_parser as add_alerts_parser

    add_alerts_parser(sub)
    from energy_pipeline.reports.cli import add_parsers as add_report_parsers

    add_report_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "needs_devtools", False):
            _require_devtools(args.command)
        settings = Settings.from_env()
        return int(args.func(args, settings) or 0)
    except _reported_errors() as exc:
        print(f"energy-pipeline: {scrub(str(exc), _env_secrets())}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - a library error may quote a DSN or URL with its password
        print(scrub(traceback.format_exc(), _env_secrets()), file=sys.stderr)
        return 1


def _reported_errors() -> tuple[type[Exception], ...]:
    """Errors printed as one line: bad settings, unreachable servers, missing tools."""
    errors: tuple[type[Exception], ...] = (ConfigError, InfluxError, StorageError, DevToolsMissing)
    # Only a development command loads the local servers' module, and only it raises ServiceError.
    services = sys.modules.get(f"{DEVTOOLS}.services")
    return errors + ((services.ServiceError,) if services is not None else ())


def _env_secrets() -> set[str]:
    """Passwords and tokens the environment holds, for scrubbing what gets printed."""
    found: set[str] = set()
    for name in ("ENERGY_PG_DSN", "DAGSTER_PG_URL", "INFLUXDB_URL"):
        found |= dsn_secrets(os.environ.get(name, ""))
    found |= {os.environ.get(n, "") for n in ("INFLUXDB_TOKEN", "INFLUXDB_PASSWORD")}
    found |= {os.environ.get(n, "") for n in ALERT_SECRET_VARIABLES}
    webhook = os.environ.get("ALERT_WEBHOOK_URL", "")
    found |= dsn_secrets(webhook) | {webhook.partition("?")[2]}
    return {s for s in found if s}


if __name__ == "__main__":
    sys.exit(main())
