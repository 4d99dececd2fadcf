"""Soak: minutes of mixed faults over tens of thousands of real deliveries, counted at the sink.

    .venv/bin/python bench/soak.py [--minutes 5] [--every 10] [--seed 1] [--families 5000]
        [--schools 4] [--no-refill] [--settle 180] [--kinds pool-child-kill,worker-kill,...]
        [--set NAME=VALUE ...] [--keep]

Everything is private and on 127.0.0.1: a throwaway PostgreSQL cluster
(``edsmart.devstack.postgres.PrivatePostgres``, migrated by ``manage.py migrate``), a
redis-server on a free port without persistence, and an SMTP sink of its own
(``bench/smtp_sink.py --record``, a separate process) that writes down every accepted message's
``X-EdSmart-Delivery`` header, recipient and acceptance time. The shared PostgreSQL on 5432
and Redis on 6379 are never touched.

It seeds ``--schools`` schools of ``--families`` families (one guardian with an address of its
own each), starts the roles as production runs them (two ``celery worker -Q periodic,send
--concurrency 2`` with different node names, and two ``celery beat`` with the
DatabaseScheduler at once, settings at their defaults but ``EDSMART_DISPATCH_INTERVAL_SECONDS=1``,
JSON logs at INFO into files of a temp dir), then makes one broadcast per school due. From
then on, for ``--minutes``, a fault every ``--every`` seconds (jittered 0.5x-1.5x, the kind
drawn with ``--seed``):

- ``pool-child-kill``: SIGKILL one pool child of a random worker (the worker forks another);
- ``worker-kill``: SIGKILL a whole worker (main process and pool) and start a replacement
  with the same node name, as a supervisor would;
- ``redis-restart``: SIGKILL redis-server, 2 s down, start it again empty on the same port;
- ``postgres-restart``: ``PrivatePostgres.restart(down_seconds=2.5)`` (a fast shutdown).

Refill (unless ``--no-refill``): whenever fewer than ``--families`` deliveries are open or
waiting to be fanned out, one more broadcast (to the next school, in turn) is made due, so the
faults keep meeting live sending for the whole time; with ``--no-refill`` the faults stop as
soon as the first broadcasts are all terminal. Then: no more faults, a bounded wait
(``--settle`` seconds) until every delivery is terminal, every mailing completed by the
sweeper and the sink quiet for 3 s, the roles stopped, and the report, from the sink's record
and the private database:

- deliveries: rows in the database, and their statuses;
- accepted: messages the sink accepted (with a delivery header; any without one are named);
- faults: injected, by kind (and any role that exited on its own, restarted like a supervisor);
- duplicates: delivery ids the sink accepted more than once, plus deliveries with more than
  one ``sent`` event in the database; must be 0;
- losses: rows not terminal at the end + rows ``sent`` that the sink never accepted + rows
  ``failed``/``cancelled``/``skipped`` (nothing refuses here, so none is expected; their
  ``last_error`` is listed) + rows never fanned out (families x broadcasts - rows) + accepted
  messages naming no row or another recipient; must be 0;
- unknowns: rows ``unknown`` (an email in flight when its pool child died: at most one per
  killed child), and how many of them the sink accepted exactly once / not at all;
- longest gaps: the three longest silences between consecutive accepted emails, when (seconds
  since the first broadcasts were due), the faults begun in the 20 s before each and during it;
- rate: accepted / (last acceptance - first acceptance), and the rate while faults were
  injected (acceptances until the last fault window closed / that time).

``--set NAME=VALUE`` (repeatable) gives the roles a setting of their own, e.g.
``--set EDSMART_SWEEP_STALE_SECONDS=2``; ``--kinds`` narrows the faults drawn.

Exit status 1 when duplicates or losses are not 0, 2 when the run could not be carried out,
130 when interrupted (Ctrl-C or SIGTERM: everything is torn down first). Worker and beat log
tails are printed when something is wrong; ``--keep`` keeps the temp dir (logs, the sink's
record; the cluster is still deleted) and prints its path.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TypeVar

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edsmart.devstack.common import LOCALHOST, free_port, mask_url  # noqa: E402
from edsmart.devstack.postgres import PrivatePostgres  # noqa: E402

T = TypeVar("T")
CELERY = str(Path(sys.executable).with_name("celery"))
DATABASE = "edsmart_soak"
FAULT_KINDS = ("pool-child-kill", "worker-kill", "redis-restart", "postgres-restart")
OPEN_STATUSES = ("pending", "claimed", "submitting", "retry_wait")
REFUSED_STATUSES = ("failed", "cancelled", "skipped")
REDIS_DOWN_SECONDS = 2.0
POSTGRES_DOWN_SECONDS = 2.5
QUIET_SECONDS = 3.0  # the sink must stay quiet this long once every row is terminal
GAP_LOOKBACK_SECONDS = 20.0  # faults this long before a silence are named with it
# Inherited variables that would change what the roles do: the soak sets its own.
STRIPPED_PREFIXES = ("EDSMART_", "CELERY_", "EMAIL_", "SENTRY_")
STRIPPED_NAMES = {"DATABASE_URL", "REDIS_URL", "DEBUG", "LOG_JSON", "LOG_LEVEL", "CONN_MAX_AGE"}


class SoakError(RuntimeError):
    """The soak could not be carried out (as opposed to the pipeline failing it)."""


def wait_for(condition: Callable[[], T], *, timeout: float, what: str, interval: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise SoakError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def kill_tree(pid: int, *, timeout: float = 10) -> None:
    """SIGKILL ``pid`` and its descendants; wait (bounded) until each is gone or a zombie."""
    try:
        parent = psutil.Process(pid)
        procs = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGCONT)
            p.send_signal(signal.SIGKILL)

    def dead(p: psutil.Process) -> bool:
        try:
            return p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    with contextlib.suppress(SoakError):
        wait_for(lambda: all(dead(p) for p in procs), timeout=timeout, what="killed processes")


# --- the roles -------------------------------------------------------------------------------


@dataclass
class Role:
    """One started process (a worker's main process, a beat) and its log file."""

    name: str  # w1, w2, beat1, beat2: a worker's replacement keeps its name
    generation: int
    popen: subprocess.Popen[bytes]
    log_path: Path
    started: float = field(default_factory=time.time)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []

    def tail(self, lines: int = 25, width: int = 400) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except FileNotFoundError:
            text = []
        state = "alive" if self.alive() else f"exited {self.popen.returncode}"
        body = "\n".join(line[:width] for line in text)
        return f"----- {self.log_path.name} (pid {self.pid}, {state}) -----\n{body}"

    def stop(self, *, grace: float = 10) -> None:
        """SIGTERM (a warm shutdown), then SIGKILL of the whole tree after ``grace``."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=grace)
        kill_tree(self.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)


class Roles:
    """Workers and beats, all started with one environment in their own sessions."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.current: dict[str, Role] = {}
        self.all: list[Role] = []

    def _spawn(self, name: str, args: list[str]) -> Role:
        generation = sum(1 for r in self.all if r.name == name) + 1
        log_path = self.workdir / (f"{name}.log" if generation == 1 else f"{name}-{generation}.log")
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                [CELERY, "-A", "edsmart", *args],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the soak only; it tears down
            )
        role = Role(name=name, generation=generation, popen=popen, log_path=log_path)
        self.current[name] = role
        self.all.append(role)
        return role

    def worker(self, name: str) -> Role:
        # The Procfile's worker line, with a node name of its own.
        return self._spawn(
            name,
            [
                *("worker", "-Q", "periodic,send", "--concurrency", "2", "-l", "info"),
                *("--hostname", f"{name}@%h", "--without-gossip", "--without-mingle"),
                *("--max-tasks-per-child", "1000"),
            ],
        )

    def beat(self, name: str) -> Role:
        return self._spawn(
            name,
            [
                *("beat", "-l", "info"),
                *("--scheduler", "django_celery_beat.schedulers:DatabaseScheduler"),
                *("--pidfile=", "-s", str(self.workdir / f"{name}-schedule")),
            ],
        )

    def workers(self) -> list[Role]:
        return [r for n, r in self.current.items() if n.startswith("w")]

    def wait_ready(self, role: Role, *, timeout: float = 90) -> None:
        def ready() -> bool:
            if not role.alive():
                raise SoakError(f"{role.name} exited at start-up (its log is below)")
            log = role.log_path.read_text(errors="replace")
            return " ready." in log and len(role.children()) >= 2

        wait_for(ready, timeout=timeout, what=f"{role.name} ready", interval=0.2)

    def tails(self, lines: int = 25) -> str:
        return "\n".join(r.tail(lines) for r in self.all)

    def stop_all(self) -> None:
        for role in self.current.values():
            if role.alive():
                with contextlib.suppress(ProcessLookupError):
                    role.popen.terminate()
        deadline = time.monotonic() + 15
        for role in self.all:
            with contextlib.suppress(subprocess.TimeoutExpired):
                role.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            kill_tree(role.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                role.popen.wait(timeout=5)


# --- Redis and the sink ----------------------------------------------------------------------


def redis_executable() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    from edsmart.devstack.embedded import redis_server_executable

    return redis_server_executable()


class PrivateRedis:
    """A redis-server without persistence on one port: a restart is a crash, queues lost."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.popen: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://{LOCALHOST}:{self.port}/0"

    def ping(self) -> bool:
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                [
                    redis_executable(),
                    *("--port", str(self.port), "--bind", LOCALHOST),
                    *("--save", "", "--appendonly", "no", "--dir", str(self.workdir)),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(self.ping, timeout=15, what=f"redis-server on port {self.port}")

    def stop(self) -> None:
        if self.popen is not None:
            kill_tree(self.popen.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=10)
            self.popen = None


@dataclass
class Acceptance:
    at: float
    delivery_id: int | None
    rcpt: str


class Sink:
    """bench/smtp_sink.py in its own process, recording every accepted message to a file."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.record_path = workdir / "accepted.txt"
        self.record_path.touch()
        self.popen = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "bench" / "smtp_sink.py"),
                str(self.port),
                *("--record", str(self.record_path)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline().strip()  # "ready", or "" if it died
        if line != "ready":
            raise SoakError(f"the SMTP sink did not start (said {line!r})")
        self._offset = 0
        self._lines = 0
        self._total: int | None = None
        self._stopped = False

    def count(self) -> int:
        """Accepted recipients so far (complete lines only), read incrementally."""
        with self.record_path.open("rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        self._lines += complete.count(b"\n")
        return self._lines

    def stop(self) -> int | None:
        """Stop the sink (its record is complete then); returns its own count. Idempotent."""
        if self._stopped:
            return self._total
        self._stopped = True
        if self.popen.poll() is None:
            self.popen.terminate()
        try:
            out, _ = self.popen.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.communicate(timeout=5)
            return None
        with contextlib.suppress(ValueError, IndexError):
            self._total = int(out.strip().split()[-1])
        return self._total

    def read(self) -> list[Acceptance]:
        records = []
        for line in self.record_path.read_text(errors="replace").splitlines():
            at, delivery, rcpt = [*line.split(" "), "-", "-"][:3]
            records.append(Acceptance(float(at), None if delivery == "-" else int(delivery), rcpt))
        return records


# --- the database, from this process -----------------------------------------------------------


def django_setup(env: dict[str, str]) -> None:
    for key in list(os.environ):
        if key.startswith(STRIPPED_PREFIXES) or key in STRIPPED_NAMES:
            del os.environ[key]
    os.environ.update(env)
    import django

    django.setup()


def db(fn: Callable[[], T]) -> T | None:
    """``fn()``, or None when the database is away (the connection is dropped for the next)."""
    from django.db import Error, connection

    try:
        return fn()
    except Error:
        with contextlib.suppress(Error):
            connection.close()
        return None


def db_forget() -> None:
    from django.db import Error, connection

    with contextlib.suppress(Error):
        connection.close()


def recorded_duplicates_sql() -> str:
    """Deliveries the database itself records as accepted more than once: the row's
    ``accepted`` count (migration 0007 on), or more than one event into ``sent`` for code from
    before it (the benches also run against older commits, to compare)."""
    from notifications.models import Delivery, DeliveryEvent

    d, e = Delivery._meta.db_table, DeliveryEvent._meta.db_table
    if any(f.name == "accepted" for f in Delivery._meta.get_fields()):
        return f"SELECT id, accepted FROM {d} WHERE accepted > 1"  # noqa: S608
    return (
        f"SELECT delivery_id, count(*) FROM {e} WHERE to_status = 'sent' "  # noqa: S608
        "GROUP BY delivery_id HAVING count(*) > 1"
    )


def school_create(
    slug: str, name: str, families: int, *, last_name: str = "Soak"
) -> tuple[int, list[int]]:
    """A school of ``families`` families, one guardian (an address of their own) and one
    student each; returns the school id and its students' ids. Bulk inserts: tens of
    thousands of ORM saves would take minutes."""
    from slips.models import Guardian, School, Student, normalize_email

    school = School.objects.create(name=name, slug=slug, sender_email=f"office@{slug}.example.org")
    kids = Student.objects.bulk_create(
        [
            Student(school=school, first_name=f"Kid{i}", last_name=last_name, year_level="3")
            for i in range(families)
        ],
        batch_size=5000,
    )
    emails = [f"parent{i}@{slug}.example.net" for i in range(families)]
    adults = Guardian.objects.bulk_create(
        [
            Guardian(
                school=school, name=f"Parent {i}", email=e, email_normalized=normalize_email(e)
            )
            for i, e in enumerate(emails)
        ],
        batch_size=5000,
    )
    link = Guardian.students.through
    link.objects.bulk_create(
        [link(guardian_id=g.pk, student_id=k.pk) for g, k in zip(adults, kids, strict=True)],
        batch_size=5000,
    )
    return school.pk, [k.pk for k in kids]


def seed(schools: int, families: int) -> list[int]:
    """``schools`` schools of ``families`` families, one guardian and address each; returns
    the schools' whole-school audience ids."""
    from django.db import connection

    from slips.models import Audience

    audiences = []
    for s in range(schools):
        school_id, _ = school_create(f"soak-{s + 1}", f"Soak School {s + 1}", families)
        audiences.append(
            Audience.objects.create(school_id=school_id, name="Everyone", whole_school=True).pk
        )
    with connection.cursor() as cur:
        cur.execute("ANALYZE")  # as autovacuum would have on a live database
    return audiences


def broadcast_due(audience_id: int, wave: int) -> int:
    """A broadcast to a whole school, drafted and scheduled for now (the service's way)."""
    from django.db import transaction

    from slips.models import Audience, Broadcast, SendStatus
    from slips.services import message_schedule

    with transaction.atomic():
        audience = Audience.objects.get(pk=audience_id)
        b = Broadcast.objects.create(
            school_id=audience.school_id,
            title=f"Soak wave {wave}",
            body=f"Dear families,\n\nThis is wave {wave} of the soak. Please read it.",
            audience=audience,
            status=SendStatus.DRAFT,
        )
        message_schedule(message=b)
    return b.pk


@dataclass
class Snapshot:
    rows: int
    open_rows: int
    undispatched: int  # broadcasts scheduled but not yet fanned out
    open_mailings: int  # mailings the sweeper has not completed yet


def snapshot() -> Snapshot:
    from django.db import connection

    from notifications.models import Delivery, Mailing
    from slips.models import Broadcast

    d, m, b = Delivery._meta.db_table, Mailing._meta.db_table, Broadcast._meta.db_table
    with connection.cursor() as cur:
        cur.execute(
            f"SELECT count(*), count(*) FILTER (WHERE status = ANY(%s)) FROM {d}",  # noqa: S608
            [list(OPEN_STATUSES)],
        )
        rows, open_rows = cur.fetchone()
        cur.execute(f"SELECT count(*) FROM {b} WHERE status = 'scheduled'")  # noqa: S608
        (undispatched,) = cur.fetchone()
        cur.execute(f"SELECT count(*) FROM {m} WHERE status = 'sending'")  # noqa: S608
        (open_mailings,) = cur.fetchone()
    return Snapshot(rows, open_rows, undispatched, open_mailings)


# --- faults ----------------------------------------------------------------------------------


@dataclass
class Fault:
    number: int
    kind: str
    started: float
    ended: float
    detail: str


class Injector:
    def __init__(
        self, *, rng: random.Random, roles: Roles, redis: PrivateRedis, pg: PrivatePostgres
    ) -> None:
        self.rng = rng
        self.roles = roles
        self.redis = redis
        self.pg = pg
        self.faults: list[Fault] = []

    def inject(self, kind: str) -> Fault:
        started = time.time()
        detail = getattr(self, kind.replace("-", "_"))()
        if detail is None:  # no pool child to kill right now: a whole worker instead
            kind, detail = "worker-kill", self.worker_kill()
        fault = Fault(len(self.faults) + 1, kind, started, time.time(), detail)
        self.faults.append(fault)
        return fault

    def pool_child_kill(self) -> str | None:
        candidates = [(w, c) for w in self.roles.workers() if w.alive() for c in w.children()]
        if not candidates:
            return None
        worker, child = self.rng.choice(candidates)
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(signal.SIGKILL)
        return f"{worker.name} pool child {child.pid}"

    def worker_kill(self) -> str:
        worker = self.rng.choice(self.roles.workers())
        kill_tree(worker.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.popen.wait(timeout=10)
        replacement = self.roles.worker(worker.name)
        return f"{worker.name} pid {worker.pid} and its pool; replacement pid {replacement.pid}"

    def redis_restart(self) -> str:
        self.redis.stop()
        time.sleep(REDIS_DOWN_SECONDS)
        self.redis.start()
        return f"down {REDIS_DOWN_SECONDS:.1f} s, back empty"

    def postgres_restart(self) -> str:
        db_forget()
        self.pg.restart(down_seconds=POSTGRES_DOWN_SECONDS)
        return f"fast shutdown, down {POSTGRES_DOWN_SECONDS:.1f} s"


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Options:
    minutes: float
    every: float
    seed: int
    schools: int
    families: int
    refill: bool
    settle: float
    kinds: tuple[str, ...]
    overrides: dict[str, str]
    keep: bool


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--minutes", type=float, default=5.0, help="how long faults are injected")
    p.add_argument("--every", type=float, default=10.0, help="mean seconds between faults")
    p.add_argument("--seed", type=int, default=1, help="seeds the faults' kinds and timing")
    p.add_argument("--schools", type=int, default=4)
    p.add_argument("--families", type=int, default=5000, help="per school (= per broadcast)")
    p.add_argument("--no-refill", action="store_true", help="no broadcasts after the first")
    p.add_argument("--settle", type=float, default=180.0, help="max seconds to reach terminal")
    p.add_argument("--kinds", default=",".join(FAULT_KINDS), help="faults to draw from")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="role env")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, record)")
    a = p.parse_args(argv)
    kinds = tuple(k.strip() for k in a.kinds.split(",") if k.strip())
    if not kinds or set(kinds) - set(FAULT_KINDS):
        p.error(f"--kinds takes some of {','.join(FAULT_KINDS)}")
    overrides = dict(item.split("=", 1) for item in a.set if "=" in item)
    return Options(
        a.minutes,
        a.every,
        a.seed,
        a.schools,
        a.families,
        not a.no_refill,
        a.settle,
        kinds,
        overrides,
        a.keep,
    )


def roles_env(
    database_url: str, redis_url: str, smtp_port: int, overrides: dict[str, str]
) -> dict[str, str]:
    """What the roles (and this process's Django) run with: production settings but the
    private services and a one-second dispatch interval."""
    return {
        "DJANGO_SETTINGS_MODULE": "edsmart.settings",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "EMAIL_BACKEND": "django.core.mail.backends.smtp.EmailBackend",
        "EMAIL_HOST": LOCALHOST,
        "EMAIL_PORT": str(smtp_port),
        "EMAIL_USE_TLS": "0",
        "SECRET_KEY": "soak-only-secret-key-not-used-anywhere-else-0123456789-abcdefghij",
        "ALLOWED_HOSTS": "localhost",
        "DEBUG": "0",
        "LOG_JSON": "1",
        "LOG_LEVEL": "INFO",
        "EDSMART_DISPATCH_INTERVAL_SECONDS": "1",
        "PYTHONUNBUFFERED": "1",
        **overrides,
    }


def migrate(env: dict[str, str], *, timeout: float = 300) -> None:
    """``manage.py migrate`` against the database ``env`` names, in a child process (this
    process may not have Django set up yet, or set up for another database)."""
    done = subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=ROOT,
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        database = mask_url(env.get("DATABASE_URL", ""))
        raise SoakError(f"migrate of {database} failed:\n{done.stdout}\n{done.stderr}")


def child_env(env: dict[str, str]) -> dict[str, str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith(STRIPPED_PREFIXES) or k in STRIPPED_NAMES)
    }
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return {**base, **env, "PYTHONPATH": path}


def say(t0: float | None, text: str) -> None:
    stamp = f"+{time.time() - t0:7.1f}s " if t0 else ""
    print(f"soak | {stamp}{text}", flush=True)


@dataclass
class Run:
    """What the soak did, for the report."""

    t0: float = 0.0
    fault_end: float = 0.0
    settled: bool = False
    broadcasts: int = 0
    refills: int = 0
    stopped_early: str = ""
    restarts: list[str] = field(default_factory=list)  # roles that exited on their own


def supervise(roles: Roles, result: Run) -> None:
    """A role that exited on its own is started again, as a supervisor would, and noted."""
    for name, role in list(roles.current.items()):
        if not role.alive():
            result.restarts.append(f"{role.name} (exit {role.popen.returncode})")
            say(
                result.t0, f"!! {role.log_path.name} exited on its own; restarting\n{role.tail(15)}"
            )
            (roles.worker if name.startswith("w") else roles.beat)(name)


def run(opts: Options, workdir: Path, stack: contextlib.ExitStack) -> int:
    rng = random.Random(opts.seed)
    started = time.monotonic()
    say(None, f"workdir {workdir}")

    pg = PrivatePostgres(prefix="edsmart-soak-pg-")
    stack.callback(pg.cleanup)
    pg.start()
    pg.create_database(DATABASE)
    redis = PrivateRedis(workdir)
    stack.callback(redis.stop)
    redis.start()
    sink = Sink(workdir)
    stack.callback(sink.stop)
    env = roles_env(pg.url(DATABASE), redis.url, sink.port, opts.overrides)
    say(None, f"private PostgreSQL on port {pg.port}, Redis on {redis.port}, sink on {sink.port}")

    migrate(env)
    django_setup(env)
    stack.callback(db_forget)
    audiences = seed(opts.schools, opts.families)
    say(None, f"seeded {opts.schools} schools x {opts.families} families")

    roles = Roles(workdir, child_env(env))
    stack.callback(roles.stop_all)
    workers = [roles.worker("w1"), roles.worker("w2")]
    roles.beat("beat1")
    roles.beat("beat2")
    for w in workers:
        roles.wait_ready(w)
    say(None, f"2 workers x2 and 2 beats up after {time.monotonic() - started:.0f} s of set-up")

    result = Run()
    injector = Injector(rng=rng, roles=roles, redis=redis, pg=pg)
    result.t0 = t0 = time.time()
    for i, audience in enumerate(audiences):
        broadcast_due(audience, i + 1)
    result.broadcasts = len(audiences)
    say(t0, f"{len(audiences)} broadcasts of {opts.families} due now")

    deadline = t0 + opts.minutes * 60
    next_fault = t0 + opts.every * rng.uniform(0.5, 1.5)
    next_progress = t0 + 15
    last: Snapshot | None = None
    while time.time() < deadline:
        snap = db(snapshot)
        last = snap or last
        if snap is not None:
            backlog = snap.open_rows + snap.undispatched * opts.families
            if opts.refill and backlog < opts.families:
                audience = audiences[result.broadcasts % len(audiences)]
                if db(lambda a=audience: broadcast_due(a, result.broadcasts + 1)) is not None:
                    result.broadcasts += 1
                    result.refills += 1
                    say(t0, f"refill: broadcast {result.broadcasts} due (open rows {backlog})")
            elif not opts.refill and snap.rows and not snap.open_rows and not snap.undispatched:
                result.stopped_early = "every delivery terminal"
                break
        supervise(roles, result)
        if time.time() >= next_fault:
            kind = rng.choice(opts.kinds)
            fault = injector.inject(kind)
            say(
                t0,
                f"fault {fault.number}: {fault.kind} ({fault.detail}) in "
                f"{fault.ended - fault.started:.1f} s; accepted {sink.count()}, "
                f"open rows {last.open_rows if last else '?'}",
            )
            next_fault = time.time() + opts.every * rng.uniform(0.5, 1.5)
        if time.time() >= next_progress:
            next_progress += 15
            if last is not None:
                say(t0, f"accepted {sink.count()}, rows {last.rows}, open {last.open_rows}")
        time.sleep(0.5)
    result.fault_end = time.time()
    say(t0, f"faults stop ({result.stopped_early or 'time is up'}); settling")

    def settled() -> bool:
        snap = db(snapshot)
        return bool(snap and not (snap.open_rows or snap.undispatched or snap.open_mailings))

    settle_deadline = time.monotonic() + opts.settle
    quiet_from: tuple[int, float] = (-1, 0.0)
    while time.monotonic() < settle_deadline:
        supervise(roles, result)
        if settled():
            count = sink.count()
            if count != quiet_from[0]:
                quiet_from = (count, time.monotonic())
            elif time.monotonic() - quiet_from[1] >= QUIET_SECONDS:
                result.settled = True
                break
        else:
            quiet_from = (-1, 0.0)
        time.sleep(0.5)
    say(
        t0,
        "every delivery terminal, every mailing completed, the sink quiet"
        if result.settled
        else "!! NOT settled in time",
    )

    roles.stop_all()
    sink_total = sink.stop()
    failed = report(opts, result, injector.faults, sink.read(), sink_total)
    if failed or not result.settled or result.restarts:
        print("\n--- role log tails ---")
        print(roles.tails())
    wall = time.monotonic() - started
    print(f"wall time: {wall:.0f} s (set-up and settling included)")
    return 1 if failed else 0


# --- the report ------------------------------------------------------------------------------


def report(
    opts: Options,
    run_: Run,
    faults: list[Fault],
    accepted: list[Acceptance],
    sink_total: int | None,
) -> bool:
    """Print the figures; True when duplicates or losses are not zero."""
    from django.db import connection

    from notifications.models import Delivery, Mailing

    def q(sql: str, params: list[object] | None = None) -> list[tuple]:
        with connection.cursor() as cur:
            cur.execute(sql, params or [])
            return cur.fetchall()

    db_forget()
    d, m = Delivery._meta.db_table, Mailing._meta.db_table
    everything = q(f"SELECT id, status, email_normalized FROM {d}")  # noqa: S608
    rows = {pk: (status, email) for pk, status, email in everything}
    statuses = Counter(status for status, _ in rows.values())
    db_dupes = q(recorded_duplicates_sql())
    mailings = dict(q(f"SELECT status, count(*) FROM {m} GROUP BY status"))  # noqa: S608

    ours = [a for a in accepted if a.delivery_id is not None]
    others = len(accepted) - len(ours)
    per_delivery = Counter(a.delivery_id for a in ours)
    dupes = {pk: n for pk, n in per_delivery.items() if n > 1}
    strays = sorted(pk for pk in per_delivery if pk not in rows)
    wrong_rcpt = [
        a for a in ours if a.delivery_id in rows and a.rcpt.lower() != rows[a.delivery_id][1]
    ]

    not_terminal = {pk: s for pk, (s, _) in rows.items() if s in OPEN_STATUSES}
    sent_unaccepted = [pk for pk, (s, _) in rows.items() if s == "sent" and pk not in per_delivery]
    refused = [pk for pk, (s, _) in rows.items() if s in REFUSED_STATUSES]
    expected = opts.families * run_.broadcasts
    never_fanned_out = max(0, expected - len(rows))
    unknown = [pk for pk, (s, _) in rows.items() if s == "unknown"]
    unknown_once = sum(1 for pk in unknown if per_delivery.get(pk) == 1)
    unknown_never = sum(1 for pk in unknown if pk not in per_delivery)
    duplicates = len(dupes) + len(db_dupes)
    losses = (
        len(not_terminal)
        + len(sent_unaccepted)
        + len(refused)
        + never_fanned_out
        + len(strays)
        + len(wrong_rcpt)
    )
    kills = Counter(f.kind for f in faults)
    children_killed = kills["pool-child-kill"] + 2 * kills["worker-kill"]

    t0 = run_.t0
    print("\n================ soak report ================")
    fault_minutes = (run_.fault_end - t0) / 60
    print(
        f"faults injected for {fault_minutes:.1f} min (every ~{opts.every:.0f} s, seed "
        f"{opts.seed}); {run_.broadcasts} broadcasts of {opts.families} "
        f"({run_.refills} refills{', refill off' if not opts.refill else ''})"
        + (f"; stopped early: {run_.stopped_early}" if run_.stopped_early else "")
    )
    print(f"deliveries (rows): {len(rows)} of {expected} expected; statuses {dict(statuses)}")
    print(f"mailings: {mailings}")
    print(
        f"accepted messages: {len(accepted)} at the sink ({len(per_delivery)} distinct "
        f"deliveries; {others} without a delivery header); the sink's own count: {sink_total}"
    )
    print(f"faults injected: {len(faults)} {dict(sorted(kills.items()))}")
    if run_.restarts:
        print(f"roles that exited on their own (restarted): {run_.restarts}")
    print(
        f"duplicates: {duplicates} (accepted more than once: {len(dupes)}"
        + (f" {sorted(dupes.items())[:20]}" if dupes else "")
        + f"; deliveries the database records as accepted more than once: {len(db_dupes)}"
        + (f" {db_dupes[:20]}" if db_dupes else "")
        + ")"
    )
    print(
        f"losses: {losses} (not terminal: {len(not_terminal)}"
        + (f" {dict(Counter(not_terminal.values()))}" if not_terminal else "")
        + f"; sent but never accepted: {len(sent_unaccepted)}"
        + (f" {sent_unaccepted[:20]}" if sent_unaccepted else "")
        + f"; failed/cancelled/skipped: {len(refused)}; never fanned out: {never_fanned_out}"
        + f"; accepted for no row: {len(strays)}; for another recipient: {len(wrong_rcpt)})"
    )
    if refused:
        errors = q(
            f"SELECT status, last_error, count(*) FROM {d} WHERE status = ANY(%s) "  # noqa: S608
            "GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 10",
            [list(REFUSED_STATUSES)],
        )
        for status, error, n in errors:
            print(f"    {n} x {status}: {error[:300]!r}")
    print(
        f"unknowns: {len(unknown)} (accepted exactly once at the sink: {unknown_once}; "
        f"not at all: {unknown_never}; at most {children_killed} expected: one email in "
        "flight per killed pool child)"
    )
    if unknown:
        for pk, error in q(
            f"SELECT id, last_error FROM {d} WHERE status = 'unknown' ORDER BY id LIMIT 10"  # noqa: S608
        ):
            print(f"    {pk}: {error[:200]!r}")

    times = sorted(a.at for a in ours)
    if len(times) >= 2:
        gaps = sorted(
            ((times[i + 1] - times[i], times[i], times[i + 1]) for i in range(len(times) - 1)),
            reverse=True,
        )[:3]
        print(
            f"first acceptance {times[0] - t0:.1f} s after the first broadcasts were due; "
            f"last at +{times[-1] - t0:.1f} s (faults ended at +{run_.fault_end - t0:.1f} s)"
        )
        for rank, (gap, start, end) in enumerate(gaps, 1):
            label = "longest gap between accepted emails" if rank == 1 else f"  gap #{rank}"
            print(
                f"{label}: {gap:.2f} s, +{start - t0:.1f} s to +{end - t0:.1f} s; "
                f"{gap_context(faults, start, end, t0)}"
            )
        span = times[-1] - times[0]
        during = sum(1 for at in times if at <= run_.fault_end)
        print(
            f"rate: {len(times) / span:.0f} accepted/s ({len(times)} over {span:.1f} s); "
            f"while faults were injected: {during / (run_.fault_end - times[0]):.0f}/s"
        )
    else:
        print("longest gap: n/a; rate: n/a (fewer than two accepted emails)")
    print("=============================================")
    verdict = "FAIL" if duplicates or losses else "OK"
    print(f"{verdict}: duplicates {duplicates}, losses {losses}, unknowns {len(unknown)}")
    return bool(duplicates or losses)


def gap_context(faults: list[Fault], start: float, end: float, t0: float) -> str:
    """The faults that began shortly before a silence and those that began during it: the
    figures say when, not why (a stall can outlast the fault that began it)."""

    def named(fs: list[Fault]) -> str:
        return ", ".join(f"#{f.number} {f.kind} at +{f.started - t0:.1f} s" for f in fs)

    before = [f for f in faults if start - GAP_LOOKBACK_SECONDS <= f.started <= start]
    during = [f for f in faults if start < f.started <= end]
    return (
        f"faults in the {GAP_LOOKBACK_SECONDS:.0f} s before it: {named(before) or 'none'}; "
        f"during it: {named(during) or 'none'}"
    )


def run_header(bench: str) -> list[str]:
    """The lines every bench report starts with: what ran, when, on which commit and machine
    (the machine is shared, so its load belongs next to the figures)."""
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    commit = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(ROOT)]
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True)
        commit = head.stdout.strip() + (" + uncommitted changes" if dirty.stdout.strip() else "")
    return [
        f"# bench/{bench} {' '.join(sys.argv[1:])}".rstrip(),
        f"date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M UTC}; commit {commit}",
        f"machine: {cpus} CPUs (nproc), {model}; load average {load} at the end; "
        f"Python {platform.python_version()}",
    ]


def run_in_workdir(
    run: Callable[[Path, contextlib.ExitStack], int],
    *,
    name: str,
    keep: bool = False,
    log_tails: bool = False,
) -> int:
    """A bench's run in a temporary directory, torn down whatever happens: Ctrl-C and SIGTERM
    (also when started in the background, where SIGINT arrives ignored) stop it, and the
    teardown itself cannot be interrupted. Exit status 2 if it could not complete."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix=f"edsmart-{name}-"))
    stack = contextlib.ExitStack()
    code = 2
    try:
        code = run(workdir, stack)
    except KeyboardInterrupt:
        print(f"{name} | interrupted; cleaning up", flush=True)
        code = 130
    except Exception as exc:  # noqa: BLE001 - whatever it was, say so and tear down
        if not isinstance(exc, SoakError):
            traceback.print_exc()
        print(f"{name} | could not complete: {exc}", flush=True)
        if log_tails:
            for log in sorted(workdir.glob("*.log")):
                print(f"----- {log.name} -----")
                print("\n".join(log.read_text(errors="replace").splitlines()[-20:]))
    finally:
        with uninterruptible():
            stack.close()  # whatever the run started, in reverse
            if keep:
                print(f"{name} | kept {workdir}", flush=True)
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    return code


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def uninterruptible() -> Iterator[None]:
    """Teardown runs to its end: a second Ctrl-C or a SIGTERM must not leave servers behind."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    return run_in_workdir(
        lambda workdir, stack: run(opts, workdir, stack),
        name="soak",
        keep=opts.keep,
        log_tails=True,
    )


if __name__ == "__main__":
    sys.exit(main())
