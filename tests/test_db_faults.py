"""PostgreSQL restarted or stopped mid-broadcast, with real processes (DESIGN.md "Faults
outside the worker").

The database is a private PostgreSQL this module starts itself
(``edsmart.devstack.postgres.PrivatePostgres``: a throwaway cluster on a free port), never the
shared server on 5432, which other people use and no test may stop. A real worker, a real beat
(the DatabaseScheduler, reading its schedule from that server) and the real web (gunicorn, as
in the Procfile) all run with ``DATABASE_URL`` on it, on a private Redis. Beat dispatches and
sweeps; this process never sends, dispatches or sweeps.

This process's Django connection is pointed at the same private database for each test: it
seeds the school and the broadcast there and reads the rows back at the end. It is one more
client of the faulted server: it closes its connection before each fault and plays no part in
the recovery. The SMTP server's record of accepted messages is the ground truth
(``tests.invariants.assert_exactly_once``), and the final statuses are also read straight
from the private server with psycopg, so they cannot come from anywhere else.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import psycopg
import pytest
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connection, connections
from django.utils import timezone

from edsmart.devstack.postgres import PrivatePostgres
from edsmart.env import database_from_url
from notifications import heartbeats
from notifications.models import Delivery, DeliveryStatus, Heartbeat, Mailing
from tests.invariants import assert_exactly_once
from tests.processes import (
    ROOT,
    Proc,
    Processes,
    RedisServer,
    free_port,
    run_python,
    scratch_dir,
    wait_until,
)
from tests.test_faults import BASE, Rig, _scheduled_broadcast, _school_with_families

pytestmark = [pytest.mark.workers]
S = DeliveryStatus

TEMPLATE = "edsmart_template"  # migrated once; each test's database is a copy of it
FAMILIES = 600
RESUME_WITHIN = 10.0  # the promise: seconds from "accepting connections" to sending
# A batch caught by the fault retries its last record with back-off (up to 2 s between tries),
# then re-raises the error that interrupted it: logged after the server is back, yet old.
LATE_ERROR_GRACE = dt.timedelta(seconds=3)
DB_ERROR = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*"
    r"(?:raised unexpected|Database gave error).*(?:OperationalError|InterfaceError)",
    re.MULTILINE,
)
OPS = "ops@dbfaults.example.org"
METRICS_TOKEN = "db-faults-metrics-token-0123456789"
SETTINGS = {
    **BASE,
    # A submitting row is an unknown after this; the batch still records the reply it kept
    # (for up to two minutes) once the database is back, settling it.
    "EDSMART_SUBMIT_LEASE_SECONDS": 10.0,
    # One batch at a time: at the fault one pool child is inside a batch and the other sits
    # between periodic tasks on an idle connection, which is the one nobody notices broke.
    "EDSMART_BATCH_PARALLELISM": 1,
    # Production's sweep cadence, lease and staleness: with shorter ones a sweep soon after
    # the restart re-nudged work whose nudges had failed with the database, which hid a stall
    # of up to 17 s that a soak run found (Redis markers outliving the batches that set them).
    "EDSMART_SWEEP_INTERVAL_SECONDS": 5.0,
    "EDSMART_SWEEP_STALE_SECONDS": 15.0,
    "EDSMART_CLAIM_LEASE_SECONDS": 8.0,
    "EDSMART_WATCH_INTERVAL_SECONDS": 1.0,
    "EDSMART_HEARTBEAT_INTERVAL_SECONDS": 1.0,
}


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivatePostgres]:
    """One private server for the module, with the schema migrated into a template database
    by ``manage.py migrate`` run against it."""
    pg = PrivatePostgres(prefix="edsmart-dbfaults-")
    try:
        pg.start()
        pg.create_database(TEMPLATE)
        env = {**os.environ, "DATABASE_URL": pg.url(TEMPLATE)}
        done = run_python("manage.py", "migrate", "--noinput", "-v", "0", env=env, timeout=180)
        assert done.returncode == 0, f"migrate failed:\n{done.stdout}\n{done.stderr}"
        yield pg
    finally:
        pg.cleanup()


@contextmanager
def _django_connected_to(url: str) -> Iterator[None]:
    """This process's default connection on ``url`` until the block ends."""
    old = connections[DEFAULT_DB_ALIAS]
    target = {k: v for k, v in database_from_url(url).items() if k != "OPTIONS"}
    new = type(old)({**copy.deepcopy(old.settings_dict), **target}, DEFAULT_DB_ALIAS)
    connections[DEFAULT_DB_ALIAS] = new
    try:
        yield
    finally:
        with suppress(DatabaseError):
            new.close()
        connections[DEFAULT_DB_ALIAS] = old


@dataclass
class DbRig(Rig):
    """The fault-test rig plus the private PostgreSQL, its database and the web process."""

    pg: PrivatePostgres
    database: str
    web_port: int

    def start_roles(self) -> None:
        """Worker, beat and web, all on the private database; wait until /readyz is OK."""
        worker = self.procs.worker("worker", queues="periodic,send", concurrency=2, wait=False)
        self.procs.beat("beat")
        self._start_web()
        self.procs.wait_ready(worker, concurrency=2)
        wait_until(
            lambda: self.readyz()[0] == 200,
            timeout=30,
            interval=0.2,
            message="/readyz OK before the fault",
            diagnostics=lambda: f"{self.readyz()}\n{self.diagnostics()}",
        )

    def _start_web(self) -> Proc:
        log_path = self.procs.workdir / "web.log"
        gunicorn = ["gunicorn", "edsmart.wsgi", "--bind", f"127.0.0.1:{self.web_port}"]
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                # No control socket: its default path in $HOME is shared by every gunicorn.
                [sys.executable, "-m", *gunicorn, "--workers", "1", "--no-control-socket"],
                cwd=ROOT,
                env={
                    **os.environ,
                    **self.procs.env,
                    "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": str(ROOT),
                },
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        web = Proc(name="web", popen=popen, log_path=log_path)
        self.procs.procs.append(web)  # killed and its log printed with the others
        return web

    def readyz(self) -> tuple[int, dict]:
        """/readyz as ops read it: with the metrics token, which shows each check's detail."""
        url = f"http://127.0.0.1:{self.web_port}/readyz"
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310 - http://127.0.0.1
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.load(error)
        except OSError:
            return 0, {}

    def sent(self) -> dict[int, int]:
        """Accepted messages per delivery: the broadcast's emails, not ops alerts."""
        with self.smtp.handler.lock:
            return Counter(a.delivery_id for a in self.smtp.accepted if a.delivery_id is not None)

    def ops_alerts(self) -> list[str]:
        with self.smtp.handler.lock:
            return [a.subject for a in self.smtp.accepted if a.rcpt == OPS]

    def broadcast(self) -> int:
        """Seed the school and a broadcast due now; beat's dispatcher makes the mailing."""
        _scheduled_broadcast(_school_with_families(FAMILIES))
        mailing = wait_until(
            Mailing.objects.first, timeout=15, message="beat dispatched", diagnostics=self.tails
        )
        return mailing.pk

    def wait_sent(self, count: int, *, timeout: float = 30) -> None:
        wait_until(
            lambda: sum(self.sent().values()) >= count,
            timeout=timeout,
            interval=0.02,
            message=f"{count} emails accepted",
            diagnostics=self.tails,
        )

    def wait_resumed(self, ready_at: float) -> float:
        """Seconds from ``ready_at`` (PostgreSQL accepting connections) to the next email."""
        before = sum(self.sent().values())
        assert before < FAMILIES, "the broadcast ended before the fault: nothing to resume"
        resumed_at = wait_until(
            lambda: sum(self.sent().values()) > before and time.monotonic(),
            timeout=max(0.0, ready_at + RESUME_WITHIN - time.monotonic()),
            interval=0.02,
            message=f"sending to resume within {RESUME_WITHIN}s of PostgreSQL accepting again",
            diagnostics=self.diagnostics,
        )
        return resumed_at - ready_at

    def database_errors_after(self, ready: dt.datetime) -> list[str]:
        """Database errors that worker, beat or web logged once the server had been back for
        a moment: a process still on a dead connection logs one per task, for ever."""
        late = []
        for proc in self.procs.procs:
            for match in DB_ERROR.finditer(proc.log()):
                at = dt.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
                if at > ready + LATE_ERROR_GRACE:
                    late.append(f"{proc.name}: {match.group(0)[:300]}")
        return late

    def forget_connection(self) -> None:
        """Before a fault: this process's connection would only die with the server."""
        with suppress(DatabaseError):
            connection.close()

    def finish(self, mailing_id: int) -> dict[str, int]:
        """Wait for beat's sweeps to make every row terminal, then check exactly-once."""
        self.settle(timeout=60, sweep=False)
        self.wait_quiet()
        counts = assert_exactly_once(self.smtp.accepted, mailing_ids=[mailing_id])
        sent = self.sent()
        assert len(sent) == FAMILIES and set(sent.values()) == {1}, "a family missed or doubled"
        with psycopg.connect(self.pg.url(self.database)) as conn:
            rows = conn.execute(
                f"SELECT status, count(*) FROM {Delivery._meta.db_table}"  # noqa: S608 - a model's table name
                " WHERE mailing_id = %s GROUP BY status",
                [mailing_id],
            ).fetchall()
        assert dict(rows) == counts, "the private server's rows differ from what Django read"
        return counts

    def tails(self) -> str:
        return f"{self.procs.tails()}\n{self.pg.logs(1500)}"

    def diagnostics(self) -> str:
        try:
            counts = dict(Counter(Delivery.objects.values_list("status", flat=True)))
        except DatabaseError as exc:
            self.forget_connection()
            counts = {"database": repr(exc)}
        return f"delivery statuses: {counts}; sent: {len(self.sent())}\n{self.tails()}"


@pytest.fixture
def db_rig(request, private_pg, smtp, settings, monkeypatch, django_db_blocker) -> Iterator[DbRig]:
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    private_pg.start()  # a test that failed half-way may have left it stopped
    name = "edsmart_" + re.sub(r"\W+", "_", request.node.name).lower()[:40]
    url = private_pg.create_database(name, template=TEMPLATE)
    with (
        scratch_dir("edsmart-dbfaults-") as workdir,
        django_db_blocker.unblock(),
        _django_connected_to(url),
    ):
        redis_server = RedisServer(workdir=workdir).start()
        env = {
            "DATABASE_URL": url,
            "REDIS_URL": redis_server.url,
            "EMAIL_BACKEND": "django.core.mail.backends.smtp.EmailBackend",
            "EMAIL_HOST": "127.0.0.1",
            "EMAIL_PORT": str(smtp.port),
            "EMAIL_USE_TLS": "0",
            "EDSMART_OPS_EMAILS": OPS,
            "SECRET_KEY": "db-fault-tests-secret-key-not-used-anywhere-else-0123456789",
            "DEBUG": "0",
            "LOG_JSON": "0",
            "LOG_LEVEL": "INFO",
            "EDSMART_METRICS_TOKEN": METRICS_TOKEN,
        }
        procs = Processes(workdir=workdir, env=env)
        rig = DbRig(
            redis=redis_server,
            smtp=smtp,
            procs=procs,
            settings=settings,
            pg=private_pg,
            database=name,
            web_port=free_port(),
        )
        rig.configure(**SETTINGS)
        try:
            yield rig
        finally:
            # Shown by pytest only when the test failed.
            print(rig.tails())
            procs.stop_all()
            redis_server.stop()


def test_postgres_restart_mid_broadcast(db_rig: DbRig) -> None:
    """A restart (fast shutdown, 2.5 s down) after ~100 of 600 emails: the worker's and
    beat's connections die with the server; sending resumes within 10 s of the server
    accepting connections, and every family gets the email exactly once, none ``unknown``
    (the outcome of the email in flight is recorded once the server is back). No role logs a
    database error once the server has been back for a moment: a pool child left on its dead
    connection would fail every task it runs, which sending resuming alone would not show
    (without the ``task_prerun`` hook of ``edsmart/celery.py`` this test fails just there)."""
    rig = db_rig
    rig.smtp.handler.behaviour.delay = 0.04  # ~50 emails/s: the broadcast outlasts the fault
    rig.start_roles()
    mailing_id = rig.broadcast()
    rig.wait_sent(100)

    rig.forget_connection()
    rig.pg.restart(2.5)
    ready_at, ready_wall = rig.pg.wait_ready(), dt.datetime.now()
    latency = rig.wait_resumed(ready_at)
    print(f"sending resumed {latency:.2f} s after PostgreSQL accepted connections again")

    counts = rig.finish(mailing_id)
    assert counts == {S.SENT: FAMILIES}, rig.diagnostics()
    assert not rig.database_errors_after(ready_wall), rig.database_errors_after(ready_wall)
    assert rig.smtp.handler.received_data == FAMILIES + len(rig.ops_alerts())  # no resend
    assert rig.readyz()[0] == 200
    for proc in rig.procs.procs:
        assert proc.alive(), proc.tail()


DOWN_FOR = 20.0


def test_postgres_down_for_a_while(db_rig: DbRig) -> None:
    """PostgreSQL stopped for 20 s mid-broadcast (production's case is a minute; 20 s
    already outlasts every lease, retry and staleness window of these settings, so a minute
    would only add CI time). While it is down nothing is sent, /readyz answers 503 naming
    the database and ops get one ``database_down`` alert by email; once it is back, the rest
    goes out exactly once and /readyz is OK again with fresh heartbeats from beat and the
    worker. An email in flight at the stop was accepted, and its batch keeps the reply until
    the database is back to record it: nothing ends ``unknown``."""
    rig = db_rig
    rig.smtp.handler.behaviour.delay = 0.04
    rig.start_roles()
    mailing_id = rig.broadcast()
    rig.wait_sent(100)

    rig.forget_connection()
    rig.pg.stop("fast")
    stopped_at = time.monotonic()
    time.sleep(2.0)  # the emails in flight at the stop get their replies
    quiet = sum(rig.sent().values())

    status, body = rig.readyz()
    assert status == 503, body
    checks = body["checks"]
    assert not checks["database"]["ok"] and "OperationalError" in checks["database"]["detail"]
    assert checks["redis"]["ok"], checks
    wait_until(
        lambda: any("database is unreachable" in s for s in rig.ops_alerts()),
        timeout=10,
        message="the database_down alert emailed to ops",
        diagnostics=rig.tails,
    )
    while time.monotonic() < stopped_at + DOWN_FOR:
        assert sum(rig.sent().values()) == quiet, "an email went out with the database down"
        time.sleep(0.5)
    for proc in rig.procs.procs:
        assert proc.alive(), proc.tail()

    restarted = timezone.now()
    rig.pg.start()
    ready_at, ready_wall = rig.pg.wait_ready(), dt.datetime.now()
    latency = rig.wait_resumed(ready_at)
    print(f"sending resumed {latency:.2f} s after PostgreSQL accepted connections again")

    counts = rig.finish(mailing_id)
    print(f"final statuses: {counts}")
    assert counts == {S.SENT: FAMILIES}, counts
    assert not rig.database_errors_after(ready_wall), rig.database_errors_after(ready_wall)
    assert rig.smtp.handler.received_data == FAMILIES + len(rig.ops_alerts())  # no resend

    def fresh_heartbeats() -> bool:
        names = set(Heartbeat.objects.filter(at__gt=restarted).values_list("name", flat=True))
        return heartbeats.BEAT in names and any(
            n.startswith(heartbeats.WORKER_PREFIX) for n in names
        )

    wait_until(fresh_heartbeats, timeout=20, interval=0.5, message="heartbeats after the outage")
    status, body = rig.readyz()
    assert status == 200, body
    database_alerts = [s for s in rig.ops_alerts() if "database is unreachable" in s]
    assert len(database_alerts) == 1, rig.ops_alerts()  # once per outage
