"""Fault tests with real Celery worker and beat processes (DESIGN.md "Proving it").

Each test creates the fault it claims to survive: work enqueued 50 times over, a pool child
killed with SIGKILL or frozen with SIGSTOP mid-send, Redis restarted or flushed mid-broadcast,
two beat schedulers, a mail server that stalls after DATA. The workers are real processes
talking to a private redis-server, the test's PostgreSQL database and an SMTP server in this
process; the SMTP server's record of accepted messages is the ground truth every test ends
with (``tests.invariants.assert_exactly_once``).

Over 400 lines on purpose: the fault rig (processes, private Redis, SMTP ground truth) and
the faults it creates are read together.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import pytest
import redis
from django.utils import timezone

from notifications import dispatch
from notifications import sweep as sweeper
from notifications.models import TERMINAL_STATUSES, Delivery, DeliveryEvent, DeliveryStatus, Mailing
from notifications.tasks import send_batch
from slips.models import Broadcast, Guardian, School, SendStatus, Slip, Student, normalize_email
from slips.services import message_schedule
from tests import factories
from tests.invariants import assert_exactly_once
from tests.processes import (
    Proc,
    Processes,
    RedisServer,
    TrackingHandler,
    child_connected_to,
    private_stack,
    wait_until,
)
from tests.smtp_server import SMTPServer

S = DeliveryStatus
pytestmark = [pytest.mark.workers, pytest.mark.django_db(transaction=True)]

# Short leases so that crashes and pauses are noticed within seconds, not minutes. They are
# given to the workers as environment variables and to this process (which runs sweeps and
# dispatches) as Django settings, so both sides agree.
BASE = {
    "EMAIL_TIMEOUT": 2.0,
    "EDSMART_CLAIM_LEASE_SECONDS": 6.0,
    "EDSMART_SUBMIT_LEASE_SECONDS": 3.0,
    "EDSMART_SWEEP_STALE_SECONDS": 2.0,
    "EDSMART_DISPATCH_INTERVAL_SECONDS": 1.0,
    "EDSMART_SWEEP_INTERVAL_SECONDS": 2.0,
    "EDSMART_BATCH_SIZE": 20,
    "EDSMART_BATCH_PARALLELISM": 2,
    "EDSMART_RETRY_BASE_SECONDS": 1.0,
    "EDSMART_RETRY_MAX_SECONDS": 2.0,
}

TASK_RECEIVED = re.compile(r"Task notifications\.tasks\.(\w+)\[([0-9a-f-]+)\] received")
TASK_FINISHED = re.compile(r"Task notifications\.tasks\.(\w+)\[([0-9a-f-]+)\] (?:succeeded|raised)")


@pytest.fixture(scope="module")
def fault_smtp() -> Iterator[SMTPServer]:
    """An SMTP server whose handler also says which client connection is inside DATA."""
    server = SMTPServer()
    server.handler = TrackingHandler()
    server.controller.handler = server.handler
    server.start()
    yield server
    server.stop()


@dataclass
class Rig:
    """Everything one fault test drives: its Redis, its SMTP server and its processes."""

    redis: RedisServer
    smtp: SMTPServer
    procs: Processes
    settings: object

    def configure(self, **values: object) -> None:
        """Give a setting to the workers (environment) and to this process (settings)."""
        for name, value in values.items():
            setattr(self.settings, name, value)
            self.procs.env[name] = str(value)

    def diagnostics(self) -> str:
        counts = Counter(Delivery.objects.values_list("status", flat=True))
        return f"delivery statuses: {dict(counts)}\n{self.procs.tails()}"

    def queued(self) -> int:
        """Messages waiting in the Celery queues (kombu keeps one Redis list per priority)."""
        with self.redis.client() as client:
            return sum(
                client.llen(key)
                for base in ("send", "periodic")
                for key in client.scan_iter(match=f"{base}*")
                if client.type(key) == b"list"
            )

    def queued_ids(self) -> set[str]:
        """The task ids of the messages waiting in the Celery queues."""
        found: set[str] = set()
        with self.redis.client() as client:
            for base in ("send", "periodic"):
                for key in client.scan_iter(match=f"{base}*"):
                    if client.type(key) == b"list":
                        for raw in client.lrange(key, 0, -1):
                            found.add(json.loads(raw)["headers"]["id"])
        return found

    def task_ids(self, name: str = "send_batch") -> tuple[set[str], set[str]]:
        received: set[str] = set()
        finished: set[str] = set()
        for proc in self.procs.procs:
            log = proc.log()
            received |= {m[1] for m in TASK_RECEIVED.findall(log) if m[0] == name}
            finished |= {m[1] for m in TASK_FINISHED.findall(log) if m[0] == name}
        return received, finished

    def wait_quiet(self, *, timeout: float = 60, minimum: int = 0) -> None:
        """Wait until no send task is queued or running, so that no late send can follow.

        Quiet must hold for half a second: a message just taken from Redis is neither queued
        nor yet logged as received for a moment.
        """
        quiet_since: list[float] = []

        def quiet() -> bool:
            try:
                queued = self.queued()
            except redis.RedisError:
                queued = -1
            received, finished = self.task_ids()
            if queued or len(received) < minimum or not received <= finished:
                quiet_since.clear()
                return False
            quiet_since.append(time.monotonic())
            return quiet_since[-1] - quiet_since[0] >= 0.5

        wait_until(
            quiet,
            timeout=timeout,
            interval=0.1,
            message="quiet queues",
            diagnostics=self.diagnostics,
        )

    def settle(self, *, timeout: float = 60, sweep: bool = True) -> None:
        """Wait until every delivery is terminal, sweeping from here to speed things up."""

        def done() -> bool:
            if sweep:
                sweeper.sweep()
            return not Delivery.objects.exclude(status__in=list(TERMINAL_STATUSES)).exists()

        wait_until(
            done,
            timeout=timeout,
            interval=0.5,
            message="every delivery terminal",
            diagnostics=self.diagnostics,
        )


@pytest.fixture
def rig(transactional_db, settings, monkeypatch, fault_smtp) -> Iterator[Rig]:
    with private_stack(
        prefix="edsmart-faults-",
        settings=settings,
        monkeypatch=monkeypatch,
        smtp=fault_smtp,
        secret_key="fault-tests-secret-key-not-used-anywhere-else-0123456789",
    ) as (private, procs, env):
        settings.EMAIL_BACKEND = env["EMAIL_BACKEND"]
        settings.EMAIL_HOST = "127.0.0.1"
        settings.EMAIL_PORT = fault_smtp.port
        settings.EMAIL_USE_TLS = False
        rig = Rig(redis=private, smtp=fault_smtp, procs=procs, settings=settings)
        rig.configure(**BASE)
        yield rig


def _school_with_families(families: int, slug: str = "northside") -> School:
    """A school with one child and one guardian per family, inserted in bulk.

    The factories save row by row, which for a few hundred families costs more than the
    fault being tested; the model's own normaliser keeps the rows what ``save`` would make.
    """
    school = factories.make_school(slug=slug)
    kids = Student.objects.bulk_create(
        Student(school=school, first_name=f"Kid{i}", last_name="Tester", year_level="3")
        for i in range(families)
    )
    emails = [f"parent{i}@{slug}.example.net" for i in range(families)]
    adults = Guardian.objects.bulk_create(
        Guardian(school=school, name=f"Parent{i}", email=e, email_normalized=normalize_email(e))
        for i, e in enumerate(emails)
    )
    Guardian.students.through.objects.bulk_create(
        Guardian.students.through(guardian_id=g.pk, student_id=k.pk)
        for g, k in zip(adults, kids, strict=True)
    )
    return school


def _scheduled_broadcast(school: School, send_at: dt.datetime | None = None) -> Broadcast:
    b = factories.make_broadcast(school=school)
    return message_schedule(message=b, send_at=send_at or timezone.now())


def _in_data(rig: Rig, workers: list[Proc]) -> tuple[psutil.Process, int] | None:
    """A pool child that is inside DATA right now, and the delivery it is sending."""
    with rig.smtp.handler.lock:
        sessions = dict(rig.smtp.handler.in_data)
    for port, delivery_id in sessions.items():
        for worker in workers:
            child = child_connected_to(worker, local_port=port)
            if child is not None:
                return child, delivery_id
    return None


# --- 1. the same work enqueued many times ------------------------------------------------------


def test_same_batch_enqueued_50_times_across_two_workers(rig: Rig) -> None:
    """100 extra batch tasks for one broadcast race in four pool children of two workers."""
    rig.configure(EDSMART_BATCH_SIZE=25)
    school = _school_with_families(300)
    _scheduled_broadcast(school)
    workers = [rig.procs.worker(f"w{i}", wait=False) for i in (1, 2)]
    for w in workers:
        rig.procs.wait_ready(w, concurrency=2)

    [mailing_id] = dispatch.dispatch_due()
    for _ in range(50):
        send_batch.delay(mailing_id)
        send_batch.delay(None)

    rig.settle(timeout=90)
    rig.wait_quiet(minimum=102)
    received, _ = rig.task_ids()
    counts = assert_exactly_once(rig.smtp.accepted, mailing_ids=[mailing_id])
    assert counts == {S.SENT: 300}
    assert rig.smtp.handler.received_data == 300  # no delivery reached DATA twice
    assert len(received) >= 102
    # The duplicates really raced in both worker processes.
    for w in workers:
        ran = [m for m in TASK_FINISHED.findall(w.log()) if m[0] == "send_batch"]
        assert len(ran) >= 10, w.tail()


# --- 2. a pool child killed mid-send -----------------------------------------------------------


@pytest.mark.parametrize("pipelining", [False, True], ids=["plain", "pipelined"])
def test_worker_child_killed_while_sending(rig: Rig, pipelining: bool) -> None:
    """SIGKILL of the pool child whose message body is at the server, awaiting the reply.

    Its row stays ``submitting`` until the sweeper makes it ``unknown``; its unused claims
    expire and are sent by others; the requeued task (reject on worker lost) is a no-op.
    Pipelined, the child has also written the next email's envelope, whose start was not
    committed: the dropped connection takes it with it, and that row is sent later, once.
    """
    rig.configure(EDSMART_BATCH_SIZE=4)
    rig.smtp.handler.behaviour.delay = 0.8
    rig.smtp.handler.behaviour.pipelining = pipelining
    school = _school_with_families(16)
    _scheduled_broadcast(school)
    worker = rig.procs.worker("w1")
    before = {c.pid for c in worker.children()}

    [mailing_id] = dispatch.dispatch_due()
    child, victim = wait_until(
        lambda: _in_data(rig, [worker]),
        timeout=30,
        interval=0.02,
        message="a child inside DATA",
        diagnostics=rig.diagnostics,
    )
    os.kill(child.pid, signal.SIGKILL)
    # Killed between "submitting" was committed and the reply was recorded.
    assert Delivery.objects.get(pk=victim).status == S.SUBMITTING, "killed too late"

    # The pool replaces the child; the main process survives.
    wait_until(
        lambda: len({c.pid for c in worker.children()} - before - {child.pid}) >= 1,
        timeout=30,
        message="a replacement pool child",
        diagnostics=rig.diagnostics,
    )
    rig.settle(timeout=60)
    rig.wait_quiet()
    rig.settle(timeout=10)

    counts = assert_exactly_once(rig.smtp.accepted, mailing_ids=[mailing_id])
    assert counts == {S.SENT: 15, S.UNKNOWN: 1}, rig.diagnostics()
    killed = Delivery.objects.get(pk=victim)
    assert killed.status == S.UNKNOWN
    assert DeliveryEvent.objects.filter(
        delivery=killed, from_status=S.SUBMITTING, to_status=S.UNKNOWN, actor="sweep"
    ).exists()
    assert rig.smtp.handler.received_data == 16  # the killed one was never sent again
    assert worker.alive()


@pytest.mark.parametrize("pipelining", [False, True], ids=["plain", "pipelined"])
def test_whole_worker_killed_gives_its_claims_back_within_15_seconds(
    rig: Rig, pipelining: bool
) -> None:
    """SIGKILL of a whole worker (main process and pool) holding claims: with the production
    lease and sweep cadence (a short lease renewed by the live batch, a sweep every 5 s), its
    claimed rows are back in play within 15 s and sent by the other worker, each once.
    Rows it had inside DATA are ``unknown``, never resent."""
    rig.configure(
        EDSMART_CLAIM_LEASE_SECONDS=8.0,
        EDSMART_SWEEP_INTERVAL_SECONDS=5.0,
        EDSMART_SWEEP_STALE_SECONDS=15.0,
        EDSMART_SUBMIT_LEASE_SECONDS=3.0,
        EDSMART_BATCH_SIZE=40,
    )
    rig.smtp.handler.behaviour.delay = 0.05
    rig.smtp.handler.behaviour.pipelining = pipelining
    school = _school_with_families(300)
    _scheduled_broadcast(school)
    victim = rig.procs.worker("w1")
    rig.procs.beat("beat")
    wait_until(
        lambda: Delivery.objects.filter(status=S.CLAIMED).count() >= 40,
        timeout=60,
        interval=0.05,
        message="the first worker holding claims",
        diagnostics=rig.diagnostics,
    )
    survivor = rig.procs.worker("w2")
    held = dict(Delivery.objects.filter(status=S.CLAIMED).values_list("pk", "attempt"))
    victim.kill()
    killed_at = time.monotonic()

    def given_back() -> bool:
        rows = Delivery.objects.filter(pk__in=held).values_list("pk", "status", "attempt")
        return all(status != S.CLAIMED or attempt != held[pk] for pk, status, attempt in rows)

    wait_until(
        given_back, timeout=30, interval=0.2, message="claims back", diagnostics=rig.diagnostics
    )
    back_after = time.monotonic() - killed_at
    print(f"{len(held)} claims of the killed worker back in play after {back_after:.1f} s")
    assert back_after <= 15, f"claims came back after {back_after:.1f} s"

    # Every row terminal is the end here (a dead worker's received tasks never finish, so
    # the quiet-queue wait of other tests does not apply); a late batch finds nothing.
    rig.settle(timeout=90)
    counts = assert_exactly_once(rig.smtp.accepted)
    assert counts[S.SENT] + counts.get(S.UNKNOWN, 0) == 300, counts
    assert counts.get(S.UNKNOWN, 0) <= 2  # at most one inside DATA per pool child
    assert survivor.alive()


# --- 3. Redis restarted or flushed mid-broadcast ----------------------------------------------


@pytest.mark.parametrize("fault", ["restart", "flushall"])
def test_redis_lost_mid_broadcast(rig: Rig, fault: str) -> None:
    """Broadcast A is being sent; B's batches wait in the queue behind A's when Redis goes.

    A's batches in flight finish their claims (their acks are lost with Redis) and may chain
    on; B's queued batches are simply gone, so only the sweeper can get B sent. A restart
    that outlasts a batch also breaks A's chain: its next batch cannot be published.
    """
    rig.smtp.handler.behaviour.delay = 0.04
    _scheduled_broadcast(_school_with_families(200, slug="northside"))
    worker = rig.procs.worker("w1")
    [big] = dispatch.dispatch_due()
    for _ in range(20):  # more of A's work queued, to be lost with Redis
        send_batch.delay(big)
    _scheduled_broadcast(_school_with_families(40, slug="southside"))
    [small] = dispatch.dispatch_due()

    wait_until(
        lambda: len(rig.smtp.accepted) >= 30,
        timeout=30,
        message="the broadcast under way",
        diagnostics=rig.diagnostics,
    )
    waiting = rig.queued_ids()
    assert waiting
    if fault == "restart":
        rig.redis.restart(down_for=3.0)
    else:
        rig.redis.flushall()
    # The queued tasks are gone. (A batch in flight may publish its next one as soon as Redis
    # is back, so the queue need not be empty; none of the old ones may be in it.)
    assert not waiting & rig.queued_ids()
    assert not Delivery.objects.filter(mailing_id=small, status=S.SENT).exists()
    assert len(rig.smtp.accepted) < 200

    rig.settle(timeout=90)
    rig.wait_quiet()
    counts = assert_exactly_once(rig.smtp.accepted, mailing_ids=[big, small])
    assert counts == {S.SENT: 240}, rig.diagnostics()
    assert rig.smtp.handler.received_data == 240
    assert worker.alive()


# --- 4. two beat schedulers -------------------------------------------------------------------


def test_two_beat_schedulers_at_once(rig: Rig) -> None:
    """Two beats fire dispatch_due and sweep every tick; each message still mails once."""
    school = _school_with_families(10)
    now = timezone.now()
    sources: list[Slip | Broadcast] = []
    for offset in (0, 3, 6):
        sources.append(_scheduled_broadcast(school, now + dt.timedelta(seconds=offset)))
    for offset in (0, 4):
        slip = factories.make_slip(school=school)
        sources.append(message_schedule(message=slip, send_at=now + dt.timedelta(seconds=offset)))

    rig.procs.worker("w1")
    beats = [rig.procs.beat("beat1"), rig.procs.beat("beat2")]
    time.sleep(15)
    fired = []
    for b in beats:
        fired.append(b.log().count("Sending due task dispatch-due"))
        assert b.alive() and fired[-1] >= 5, b.tail()
    rig.settle(timeout=30, sweep=False)  # the beats' own sweeps finish the job
    for b in beats:
        b.kill()
    rig.wait_quiet()
    wait_until(
        lambda: not Mailing.objects.filter(status=Mailing.Status.SENDING).exists(),
        timeout=20,
        interval=0.5,
        message="mailings completed",
        diagnostics=rig.diagnostics,
    )

    for source in sources:
        source.refresh_from_db()
        assert source.status == SendStatus.SENT
        assert source.mailings.count() == 1
    counts = assert_exactly_once(rig.smtp.accepted)
    assert counts == {S.SENT: 50}
    assert len(rig.smtp.accepted) == 50
    received, _ = rig.task_ids("dispatch_due")
    assert len(received) > max(fired)  # both schedulers' ticks reached the worker


# --- 5. a paused worker racing the sweeper ------------------------------------------------------


def test_paused_worker_past_its_leases_races_the_sweeper(rig: Rig) -> None:
    """SIGSTOP a child mid-DATA past both leases, let the sweeper act, then SIGCONT it.

    The late 250 for the same attempt settles the ``unknown`` row as sent; the claims it
    still held were re-claimed under a new attempt and sent once by others, so its stale
    tokens can start nothing when it wakes.
    """
    rig.configure(EDSMART_BATCH_SIZE=3, EDSMART_CLAIM_LEASE_SECONDS=5.0)
    rig.smtp.handler.behaviour.delay = 0.7
    school = _school_with_families(12)
    _scheduled_broadcast(school)
    workers = [
        rig.procs.worker("w1", wait=False),
        rig.procs.worker("w2", concurrency=1, wait=False),
    ]
    rig.procs.wait_ready(workers[0], concurrency=2)
    rig.procs.wait_ready(workers[1], concurrency=1)

    [mailing_id] = dispatch.dispatch_due()
    child, victim = wait_until(
        lambda: _in_data(rig, workers),
        timeout=30,
        interval=0.02,
        message="a child inside DATA",
        diagnostics=rig.diagnostics,
    )
    child.suspend()  # SIGSTOP, with the body sent and the reply not yet read
    try:
        frozen = Delivery.objects.get(pk=victim)
        assert frozen.status == S.SUBMITTING, "stopped too late"
        attempt = frozen.attempt

        # While it sleeps: its submit lease runs out (-> unknown), its other claims run out
        # (-> pending) and the other workers send them.
        def swept() -> bool:
            sweeper.sweep()
            stale = DeliveryEvent.objects.filter(
                from_status=S.CLAIMED, to_status=S.PENDING, actor="sweep"
            )
            return (
                Delivery.objects.get(pk=victim).status == S.UNKNOWN
                and stale.exists()
                and not Delivery.objects.exclude(status__in=list(TERMINAL_STATUSES)).exists()
            )

        wait_until(
            swept,
            timeout=40,
            interval=0.5,
            message="sweeper took over",
            diagnostics=rig.diagnostics,
        )
        # The server accepted it meanwhile; the reply sits unread in the frozen child's socket.
        assert [a.delivery_id for a in rig.smtp.accepted].count(victim) == 1
    finally:
        child.resume()  # SIGCONT

    wait_until(
        lambda: Delivery.objects.get(pk=victim).status == S.SENT,
        timeout=20,
        interval=0.2,
        message="the late 250 settles the unknown row",
        diagnostics=rig.diagnostics,
    )
    rig.wait_quiet()
    rig.settle(timeout=10)

    counts = assert_exactly_once(rig.smtp.accepted, mailing_ids=[mailing_id])
    assert counts == {S.SENT: 12}
    settled = Delivery.objects.get(pk=victim)
    assert settled.attempt == attempt
    assert DeliveryEvent.objects.filter(
        delivery=settled, from_status=S.UNKNOWN, to_status=S.SENT, attempt=attempt
    ).exists()
    stale_ids = set(
        DeliveryEvent.objects.filter(
            from_status=S.CLAIMED, to_status=S.PENDING, actor="sweep"
        ).values_list("delivery_id", flat=True)
    )
    # The stale claims were re-claimed (a new fencing token) and sent once, by someone else.
    for d in Delivery.objects.filter(pk__in=stale_ids):
        assert d.status == S.SENT and d.attempt >= 2
    assert rig.smtp.handler.received_data == 12  # nothing reached DATA twice


# --- 6. a mail server that stalls after DATA ---------------------------------------------------


def test_stall_after_data_in_a_worker_run_broadcast(rig: Rig) -> None:
    """The server takes the body, then is silent past EMAIL_TIMEOUT: ``unknown``, never resent."""
    rig.configure(EMAIL_TIMEOUT=1.0, EDSMART_BATCH_SIZE=10, EDSMART_BATCH_PARALLELISM=1)
    rig.smtp.handler.behaviour.stall = 2.5
    school = _school_with_families(6)
    _scheduled_broadcast(school)
    rig.procs.worker("w1", concurrency=1)

    [mailing_id] = dispatch.dispatch_due()
    wait_until(
        lambda: sweeper.sweep() and rig.smtp.handler.received_data >= 2,
        timeout=30,
        interval=0.02,
        message="two stalled sends",
        diagnostics=rig.diagnostics,
    )
    rig.smtp.handler.behaviour.stall = 0
    rig.settle(timeout=30)
    for _ in range(3):  # later sweeps and batches must leave the unknowns alone
        sweeper.sweep()
        send_batch.delay(mailing_id)
    rig.wait_quiet()

    stalled = set(rig.smtp.handler.stalled)
    assert len(stalled) == 2
    counts = assert_exactly_once(rig.smtp.accepted, mailing_ids=[mailing_id])
    assert counts == {S.SENT: 4, S.UNKNOWN: 2}
    unknown = Delivery.objects.filter(status=S.UNKNOWN)
    assert set(unknown.values_list("pk", flat=True)) == stalled
    assert all("after DATA" in d.last_error for d in unknown)
    assert rig.smtp.handler.received_data == 6  # never resent
