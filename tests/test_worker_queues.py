"""A worker started as Celery's documentation shows (``celery -A edsmart worker``, no ``-Q``)
consumes every queue the project routes to; ``-Q`` only narrows that (project issue 13).

Without ``task_queues`` Celery consumes only the default queue (``periodic``) when no ``-Q`` is
given, so such a worker dispatched messages for ever and the email batches waited in ``send``
with nothing to say why. ``edsmart.celery`` declares the queues the settings route to.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest
from django.conf import settings as django_settings
from django.utils import timezone

from edsmart.celery import app as celery_app
from edsmart.celery import routed_queue_names
from notifications import dispatch
from notifications.models import Delivery, DeliveryStatus
from slips.services import message_schedule
from tests import factories
from tests.processes import Proc, Processes, RedisServer, private_stack, wait_until
from tests.smtp_server import SMTPServer

SEND_BATCH_RECEIVED = re.compile(r"Task notifications\.tasks\.send_batch\[[0-9a-f-]+\] received")


# --- the declarations ----------------------------------------------------------------------------


def test_every_queue_the_settings_route_to_is_consumed_without_q():
    routed = {r["queue"] for r in django_settings.CELERY_TASK_ROUTES.values()}
    expected = {django_settings.CELERY_TASK_DEFAULT_QUEUE, *routed}
    assert expected == {"send", "periodic"}
    assert set(routed_queue_names(celery_app.conf)) == expected
    # What a worker consumes when no -Q narrows it.
    assert set(celery_app.amqp.queues.consume_from) == expected


def test_routing_is_still_the_settings_and_matches_the_declarations():
    router = celery_app.amqp.router
    for task, queue in [
        ("notifications.tasks.send_batch", "send"),
        ("notifications.tasks.dispatch_due", "periodic"),
        ("notifications.tasks.sweep", "periodic"),
    ]:
        routed = router.route({}, task)["queue"]
        declared = celery_app.amqp.queues[queue]
        # The same name, exchange and key the worker binds: a publish reaches the consumer.
        assert (routed.name, routed.exchange.name, routed.routing_key) == (queue, queue, queue)
        assert (declared.exchange.name, declared.exchange.type, declared.routing_key) == (
            queue,
            "direct",
            queue,
        )


def test_q_only_narrows_the_declared_queues():
    queues = celery_app.amqp.Queues(celery_app.conf.task_queues)
    queues.select(["periodic"])
    assert set(queues.consume_from) == {"periodic"}
    queues = celery_app.amqp.Queues(celery_app.conf.task_queues)
    queues.select(["periodic", "send"])
    assert set(queues.consume_from) == {"periodic", "send"}


# --- a real worker -------------------------------------------------------------------------------


class DocumentedProcesses(Processes):
    """``Processes`` plus a worker started the way Celery's documentation shows: no ``-Q``."""

    def worker_without_q(self, name: str, *, concurrency: int = 1) -> Proc:
        proc = self._spawn(
            name,
            [
                "worker",
                "--concurrency",
                str(concurrency),
                "-l",
                "info",
                # Only to start fast and stay private; none of them chooses queues.
                "--without-heartbeat",
                "--without-mingle",
                "--without-gossip",
                "-n",
                f"{name}@%h",
            ],
            None,
        )
        self.wait_ready(proc, concurrency=concurrency)
        return proc


def _banner_queues(proc: Proc) -> set[str]:
    """The queues a worker's start-up banner says it consumes (``.> send exchange=...``)."""
    return set(re.findall(r"^\s*\.> (\S+)\s+exchange=", proc.log(), flags=re.MULTILINE))


@pytest.fixture
def rig(
    transactional_db, settings, monkeypatch, smtp_session
) -> Iterator[tuple[RedisServer, DocumentedProcesses, SMTPServer]]:
    with private_stack(
        prefix="edsmart-queues-",
        settings=settings,
        monkeypatch=monkeypatch,
        smtp=smtp_session,
        secret_key="queue-tests-secret-key-not-used-anywhere-else-0123456789",
        processes=DocumentedProcesses,
    ) as (private, procs, _env):
        yield private, procs, smtp_session


def _queued(redis: RedisServer, queue: str) -> int:
    """Messages waiting in ``queue`` (kombu keeps one Redis list per priority)."""
    with redis.client() as client:
        return sum(
            client.llen(key)
            for key in client.scan_iter(match=f"{queue}*")
            if client.type(key) == b"list"
        )


@pytest.mark.workers
def test_a_worker_started_without_q_sends_and_q_only_narrows(rig) -> None:
    redis, procs, smtp = rig
    school = factories.make_school(slug="queues")
    for _ in range(3):
        factories.make_family(school=school)
    message_schedule(message=factories.make_broadcast(school=school), send_at=timezone.now())

    # A worker narrowed to the periodic queue leaves the send batches alone.
    narrowed = procs.worker("narrowed", queues="periodic", concurrency=1)
    assert _banner_queues(narrowed) == {"periodic"}

    # The dispatcher publishes the batches as the pipeline always does: nudges.enqueue_batches
    # sends notifications.tasks.send_batch by name, which the settings route to "send".
    [mailing_id] = dispatch.dispatch_due()
    assert _queued(redis, "send") >= 1
    time.sleep(2)  # time enough for a worker that consumed "send" to take it
    assert _queued(redis, "send") >= 1 and not smtp.accepted
    assert not SEND_BATCH_RECEIVED.search(narrowed.log()), narrowed.tail()

    # A worker with no -Q consumes every queue and sends.
    documented = procs.worker_without_q("documented")
    wait_until(
        lambda: len(smtp.accepted) >= 3,
        timeout=30,
        message="three emails sent by the worker started without -Q",
        diagnostics=procs.tails,
    )
    assert SEND_BATCH_RECEIVED.search(documented.log()), documented.tail()
    assert _banner_queues(documented) == {"periodic", "send"}
    assert not SEND_BATCH_RECEIVED.search(narrowed.log()), narrowed.tail()
    deliveries = Delivery.objects.filter(mailing_id=mailing_id)
    wait_until(
        lambda: set(deliveries.values_list("status", flat=True)) == {DeliveryStatus.SENT},
        timeout=30,
        message="every delivery recorded as sent",
        diagnostics=procs.tails,
    )
    assert sorted(a.rcpt for a in smtp.accepted) == sorted(
        deliveries.values_list("email_normalized", flat=True)
    )
