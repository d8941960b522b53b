"""Local InfluxDB 1.x and PostgreSQL servers under a directory of ours, on loopback ports.

Used by `energy-pipeline services` for the live stack and by the test suite, which starts the same
servers on free ports in temporary directories. Nothing here imports Dagster.
"""

from __future__ import annotations

import glob
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

LOOPBACK = "127.0.0.1"


class ServiceError(RuntimeError):
    """A local server could not be installed, started or reached."""


def _ephemeral_floor() -> int:
    """The lowest port the kernel hands to outgoing connections (Linux default 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """Return a TCP port on the loopback interface that nothing listens on right now.

    Picked below the ephemeral range: a port the kernel assigns (bind to 0) may meanwhile become
    the local end of some outgoing connection, and the server started on it then fails with
    "address already in use".
    """
    low, high = 20_000, _ephemeral_floor()
    for _ in range(50):
        port = random.randrange(low, high) if high > low else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise ServiceError(f"no free loopback port found in {low}-{high}")


def port_in_use(port: int) -> bool:
    """True when something already listens on the loopback port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((LOOPBACK, port)) == 0


def _pid_alive(pid_file: Path, command: str | None = None) -> int | None:
    """The pid in `pid_file` if that process runs (and, given `command`, is that program).

    After a reboot a stale pid file can name an unrelated process that reused the pid.
    """
    try:
        pid = int(pid_file.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None
    if command is not None:
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            return None
        if Path(argv0.decode(errors="replace")).name != command:
            return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def _wait_until(check, timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
    raise ServiceError(f"{what} did not become ready within {timeout_s:.0f}s; log {log}:\n{tail}")


def _check_port_free(port: int, what: str) -> None:
    if port_in_use(port):
        raise ServiceError(
            f"port {LOOPBACK}:{port} for {what} is already taken by another program; "
            f"stop it or choose another port (see README: ENERGY_*_PORT)"
        )


def _toml(value: int | str) -> str:
    return str(value) if isinstance(value, int) else '"' + value + '"'


@dataclass
class LocalInflux:
    """An InfluxDB 1.x server (Debian's `influxd`) with its data under `root`."""

    root: Path
    port: int
    auth: bool = False  # require username/password (create the first admin with `create_admin`)
    # Extra `[coordinator]` settings, e.g. {"max-select-point": 100000}: server limits that
    # fault-injection tests set the way production servers do.
    coordinator: dict[str, int | str] = field(default_factory=dict)
    # Extra `[http]` settings, e.g. {"max-row-limit": 100}.
    http: dict[str, int | str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.root / "influxd.pid"

    @property
    def log_file(self) -> Path:
        return self.root / "influxd.log"

    def _config(self) -> str:
        # The RPC port is only used by backup/restore; it must not collide with another instance.
        rpc_port = free_port()
        limits = {"query-timeout": "0s", **self.coordinator}
        coordinator = "\n".join(f"  {k} = {_toml(v)}" for k, v in limits.items())
        http = "".join(f"\n  {k} = {_toml(v)}" for k, v in self.http.items())
        return f"""reporting-disabled = true
bind-address = "{LOOPBACK}:{rpc_port}"
[meta]
  dir = "{self.root}/meta"
[data]
  dir = "{self.root}/data"
  wal-dir = "{self.root}/wal"
  query-log-enabled = false
  max-series-per-database = 0
  max-values-per-tag = 0
[coordinator]
{coordinator}
[http]
  bind-address = "{LOOPBACK}:{self.port}"
  auth-enabled = {"true" if self.auth else "false"}
  log-enabled = false
  max-body-size = 0{http}
[monitor]
  store-enabled = false
[continuous_queries]
  enabled = false
"""

    def create_admin(self, username: str, password: str) -> None:
        """Create the first admin user (allowed without credentials while no user exists)."""
        # InfluxQL has no bound parameters for CREATE USER: accept only plain words.
        if not (username.isidentifier() and password.isalnum()):
            raise ServiceError("admin username must be an identifier and password alphanumeric")
        stmt = f"CREATE USER \"{username}\" WITH PASSWORD '{password}' WITH ALL PRIVILEGES"
        requests.post(f"{self.url}/query", data={"q": stmt}, timeout=10).raise_for_status()

    def ping(self) -> bool:
        try:
            return requests.get(f"{self.url}/ping", timeout=1).status_code == 204
        except requests.RequestException:
            return False

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return _pid_alive(self.pid_file, "influxd")

    def running(self) -> bool:
        return self.pid is not None and self.ping()

    def start(self, timeout_s: float = 30) -> None:
        """Start the server unless it is already running; idempotent."""
        if self.running():
            return
        influxd = shutil.which("influxd")
        if influxd is None:
            raise ServiceError(
                "influxd not found: run ./scripts/bootstrap (installs Debian 'influxdb')"
            )
        _check_port_free(self.port, "InfluxDB")
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "influxdb.conf"
        config.write_text(self._config())
        with open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                [influxd, "-config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pid_file.write_text(str(proc.pid))
        _wait_until(self.ping, timeout_s, f"InfluxDB on port {self.port}", self.log_file)

    def stop(self, timeout_s: float = 30) -> None:
        _stop_pid(self.pid_file, timeout_s, "influxd")


@dataclass
class LocalPostgres:
    """A PostgreSQL cluster (Debian binaries) with its data under `root`, run as a non-root user."""

    root: Path
    port: int
    fast_unsafe: bool = False  # fsync off: for throwaway test clusters only

    @property
    def data_dir(self) -> Path:
        return self.root / "pgdata"

    @property
    def log_file(self) -> Path:
        return self.root / "postgres.log"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "postmaster.pid"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/{dbname}"

    @staticmethod
    def bin_dir() -> Path:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not found:
            raise ServiceError(
                "PostgreSQL server binaries not found: run ./scripts/bootstrap "
                "(installs Debian 'postgresql')"
            )
        return Path(found[-1]).parent

    def _as_owner(self, args: list[str]) -> list[str]:
        # PostgreSQL refuses to run as root; use Debian's `postgres` system user in that case.
        if os.geteuid() != 0:
            return args
        try:
            pwd.getpwnam("postgres")
        except KeyError as exc:
            raise ServiceError(
                "running as root but there is no 'postgres' user to run the server"
            ) from exc
        return ["runuser", "-u", "postgres", "--", *args]

    def ready(self) -> bool:
        result = subprocess.run(
            [str(self.bin_dir() / "pg_isready"), "-q", "-h", LOOPBACK, "-p", str(self.port)],
            check=False,
        )
        return result.returncode == 0

    def running(self) -> bool:
        return _pid_alive(self.pid_file) is not None and self.ready()

    def _prepare_dir(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            probe = subprocess.run(
                ["runuser", "-u", "postgres", "--", "test", "-w", str(self.root)], check=False
            )
            if probe.returncode != 0:
                raise ServiceError(
                    f"user 'postgres' cannot write {self.root} (a parent directory is not "
                    "traversable); set ENERGY_DATA_DIR to a directory under /var/tmp or /srv"
                )

    def start(self, timeout_s: float = 60) -> None:
        """Initialise the cluster on first use and start it unless already running; idempotent."""
        if self.running():
            return
        bins = self.bin_dir()
        _check_port_free(self.port, "PostgreSQL")
        self._prepare_dir()
        if not (self.data_dir / "PG_VERSION").exists():
            subprocess.run(
                self._as_owner(
                    [
                        str(bins / "initdb"),
                        "-D",
                        str(self.data_dir),
                        "-U",
                        "postgres",
                        "--auth=trust",
                        "-E",
                        "UTF8",
                        "--locale=C.UTF-8",
                    ]
                ),
                check=True,
                stdout=subprocess.DEVNULL,
            )
        settings = {
            "listen_addresses": LOOPBACK,
            "port": str(self.port),
            "unix_socket_directories": str(self.root),
            "max_connections": "200",
            "shared_buffers": "512MB",
            "max_wal_size": "4GB",
            "checkpoint_timeout": "15min",
        }
        if self.fast_unsafe:
            settings.update(
                {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
            )
        options = " ".join(f"-c {k}={v}" for k, v in settings.items())
        result = subprocess.run(
            self._as_owner(
                [
                    str(bins / "pg_ctl"),
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_file),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    str(int(timeout_s)),
                    "start",
                ]
            ),
            check=False,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            tail = (
                self.log_file.read_text(errors="replace")[-2000:] if self.log_file.exists() else ""
            )
            raise ServiceError(f"PostgreSQL failed to start: {result.stderr.strip()}\n{tail}")
        _wait_until(self.ready, timeout_s, f"PostgreSQL on port {self.port}", self.log_file)

    def stop(self, timeout_s: float = 60) -> None:
        if not (self.data_dir / "PG_VERSION").exists() or _pid_alive(self.pid_file) is None:
            return
        subprocess.run(
            self._as_owner(
                [
                    str(self.bin_dir() / "pg_ctl"),
                    "-D",
                    str(self.data_dir),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    str(int(timeout_s)),
                    "stop",
                ]
            ),
            check=False,
            capture_output=True,
        )

    def create_database(self, name: str, *, private: bool = False) -> None:
        """Create a database if it does not exist (name validated as a plain identifier);
        `private`: only its owner (the superuser here) may connect to it."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                if private:
                    conn.execute(
                        sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC").format(
                            sql.Identifier(name)
                        )
                    )


def _stop_pid(pid_file: Path, timeout_s: float, command: str) -> None:
    pid = _pid_alive(pid_file, command)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:  # reap it if it is our own child, or it lingers as a zombie
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if _pid_alive(pid_file, command) is None:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
