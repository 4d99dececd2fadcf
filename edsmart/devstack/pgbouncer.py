"""A private PgBouncer in transaction pooling mode, in front of a PostgreSQL we already have.

    python -m edsmart.devstack.pgbouncer [--pool-size 20] [--drop-database NAME] -- COMMAND ...

Why it exists: large Django and Celery fleets reach PostgreSQL through a connection pooler in
transaction mode, where consecutive transactions of one client may run on different server
connections. Anything that keeps state in a *session* (a server-side prepared statement, a
``SET`` without ``LOCAL``, an advisory lock, a ``WITH HOLD`` cursor, a temp table, ``LISTEN``)
then leaks to another client or vanishes under its owner. The only way to know the pipeline
keeps none is to run its tests through one, which CI does (``.ci/run``) with this helper.

The CLI starts PgBouncer (Debian's ``pgbouncer`` package: ``apt-get install pgbouncer``) on a
free port of 127.0.0.1 with its own config in a temp dir, forwarding every database name to
the host and port of ``DATABASE_URL`` (``* = host=... port=...``, so the test database that
Django creates is reachable too), then runs COMMAND with ``DATABASE_URL`` pointing at it and
the settings a transaction pooler needs (``DB_TRANSACTION_POOLER=1``, which turns server-side
prepared statements and Django's server-side cursors off). Afterwards it prints PgBouncer's
totals and fails when COMMAND succeeded without a single transaction through it, so a
mis-wired step cannot pass vacuously. ``--drop-database`` drops a database (directly on the
upstream server, with ``FORCE``) once PgBouncer is stopped: a pooler keeps idle server
connections, so a test database cannot be dropped through it while it runs.

PgBouncer refuses to run as root; as root it runs as the ``postgres`` system user (as
``edsmart.devstack.postgres`` runs the server).
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from edsmart.devstack.common import LOCALHOST, free_port, log
from edsmart.devstack.postgres import _system_user

CANDIDATES = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")


def pgbouncer_executable() -> str | None:
    """Debian puts it in /usr/sbin, which a non-root PATH may lack."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    return next((c for c in CANDIDATES if os.access(c, os.X_OK)), None)


class PrivatePgBouncer:
    """One PgBouncer: ``start()``, ``url(database)``, ``totals()``, ``stop()``.

    ``pool_size`` is the server connections per (database, user) pair: the number of
    transactions that can run at once, whatever the number of clients.
    """

    def __init__(
        self,
        *,
        upstream_host: str,
        upstream_port: int,
        pool_size: int = 20,
        max_clients: int = 1000,
        user: str = "postgres",
    ) -> None:
        executable = pgbouncer_executable()
        if executable is None:
            raise RuntimeError("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
        self.executable = executable
        self.user = user
        self.root = Path(tempfile.mkdtemp(prefix="edsmart-pgbouncer-"))
        self.port = free_port()
        self.config = self.root / "pgbouncer.ini"
        self.log_path = self.root / "pgbouncer.log"
        self.popen: subprocess.Popen[bytes] | None = None
        (self.root / "userlist.txt").write_text(f'"{user}" ""\n')
        # pool_mode=transaction is the point. ignore_startup_parameters: drivers send some that
        # PgBouncer 1.18 does not know. server_reset_query is only used in session mode.
        self.config.write_text(
            "[databases]\n"
            f"* = host={upstream_host} port={upstream_port}\n"
            "[pgbouncer]\n"
            f"listen_addr = {LOCALHOST}\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.root / 'userlist.txt'}\n"
            f"admin_users = {user}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {pool_size}\n"
            f"max_client_conn = {max_clients}\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
            f"logfile = {self.log_path}\n"
            f"pidfile = {self.root / 'pgbouncer.pid'}\n"
        )
        self.system_user = _system_user()
        if self.system_user is not None:
            entry = pwd.getpwnam(self.system_user)
            for path in (self.root, *self.root.iterdir()):
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def start(self, timeout: float = 15) -> PrivatePgBouncer:
        command = [self.executable, str(self.config)]
        if self.system_user is not None:
            command = ["runuser", "-u", self.system_user, "--", *command]
        self.popen = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C for the command is not a shutdown request
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.totals()
                return self
            except (OSError, RuntimeError) as exc:
                if self.popen.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"pgbouncer did not start: {exc}\n{self.logs()}") from exc
                time.sleep(0.05)

    def url(self, database: str) -> str:
        return f"postgres://{self.user}@{LOCALHOST}:{self.port}/{database}"

    def logs(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"

    def totals(self) -> dict[str, int]:
        """``SHOW STATS`` summed over real databases: total_xact_count, total_query_count, ...

        The admin console speaks only the simple query protocol, hence the raw ``exec_``.
        """
        import psycopg

        try:
            conn = psycopg.connect(self.url("pgbouncer"), autocommit=True, connect_timeout=2)
        except psycopg.OperationalError as exc:
            raise RuntimeError(str(exc)) from exc
        try:
            result = conn.pgconn.exec_(b"SHOW STATS")
            names = [result.fname(i).decode() for i in range(result.nfields)]
            sums: dict[str, int] = {}
            database = names.index("database")
            for row in range(result.ntuples):
                if result.get_value(row, database) == b"pgbouncer":
                    continue  # the admin console: these very queries
                for col, name in enumerate(names):
                    value = result.get_value(row, col)
                    if name.startswith("total_") and value is not None:
                        sums[name] = sums.get(name, 0) + int(value.decode())
            return sums
        finally:
            conn.close()

    def stop(self) -> None:
        """SIGINT: PgBouncer's "safe shutdown" would wait for clients; SIGTERM is immediate."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)
        self.popen = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PrivatePgBouncer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def through(url: str, bouncer: PrivatePgBouncer) -> str:
    """``url`` with its host and port replaced by the bouncer's (same user, database, query)."""
    parts = urlsplit(url)
    auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{auth}{LOCALHOST}:{bouncer.port}"))


def drop_database(url: str, name: str) -> None:
    """Drop ``name`` on the server ``url`` names, even with sessions left on it."""
    import psycopg
    from psycopg import sql

    parts = urlsplit(url)
    admin = urlunsplit(parts._replace(path="/postgres", query=""))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def main(argv: list[str] | None = None) -> int:
    """Run a command through a fresh PgBouncer; its exit status, or 1 if it never used it."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--pool-size", type=int, default=20, help="server connections per pool")
    parser.add_argument("--drop-database", default=None, help="drop it afterwards (upstream)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command: python -m edsmart.devstack.pgbouncer -- COMMAND ...")
    upstream = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/edsmart")
    parts = urlsplit(upstream)
    if not parts.hostname or parts.hostname.startswith("/"):
        parser.error("DATABASE_URL must name a TCP host for PgBouncer to forward to")
    bouncer = PrivatePgBouncer(
        upstream_host=parts.hostname, upstream_port=parts.port or 5432, pool_size=args.pool_size
    )
    try:
        bouncer.start()
        env = {
            **os.environ,
            "DATABASE_URL": through(upstream, bouncer),
            "DB_TRANSACTION_POOLER": "1",
            "DB_PREPARED_STATEMENTS": "0",
        }
        log(f"pgbouncer {bouncer.port} (pool_mode=transaction) -> {parts.hostname}:{parts.port}")
        code = subprocess.run(command, env=env, check=False).returncode
        totals = bouncer.totals()
        log(
            f"pgbouncer carried {totals.get('total_xact_count', 0)} transactions, "
            f"{totals.get('total_query_count', 0)} queries"
        )
        if code == 0 and not totals.get("total_xact_count"):
            log("error: the command succeeded but no transaction went through pgbouncer")
            code = 1
    finally:
        bouncer.cleanup()
    if args.drop_database:
        drop_database(upstream, args.drop_database)
    return code


if __name__ == "__main__":
    sys.exit(main())
