"""Signs of life from beat and the workers, written to ``Heartbeat`` rows and read by ops.

Beat and workers are watched separately, so that ops can tell which one stopped:

- ``beat``: written by the beat process itself each time it publishes a scheduled task
  (Celery's ``after_task_publish`` signal, in the process that ``beat_init`` marked), at most
  once every few seconds. A task run on a worker could not tell a dead beat from a dead
  worker: both would stop it.
- ``worker:<hostname>``: written when a worker is ready (``worker_ready``) and each time it runs
  the periodic ``heartbeat`` task (``notifications.tasks.heartbeat``).

The signal receivers are connected when this module is imported; ``notifications.tasks``
imports it, and Celery imports the task modules in both beat and workers before they start.
Recording never raises: a database hiccup must not stop beat from scheduling.
"""

from __future__ import annotations

import datetime as dt
import logging
import time

from celery.signals import after_task_publish, beat_init, worker_ready
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from notifications.models import Heartbeat

log = logging.getLogger("edsmart.heartbeats")

BEAT = "beat"
WORKER_PREFIX = "worker:"

# Beat publishes a dispatch every couple of seconds; one write per interval is plenty.
BEAT_WRITE_INTERVAL_SECONDS = 10.0

_in_beat = False
_last_beat_write = 0.0


def beat_max_age() -> float:
    return float(settings.EDSMART_BEAT_MAX_AGE_SECONDS)


def worker_max_age() -> float:
    return float(settings.EDSMART_WORKER_MAX_AGE_SECONDS)


def heartbeat_record(*, name: str) -> None:
    """Upsert ``name`` to now: one statement, so two writers at once cannot collide."""
    Heartbeat.objects.bulk_create(
        [Heartbeat(name=name[:200], at=timezone.now())],
        update_conflicts=True,
        unique_fields=["name"],
        update_fields=["at"],
    )


def worker_record(*, hostname: str) -> None:
    heartbeat_record(name=f"{WORKER_PREFIX}{hostname}")


def beat_age_seconds(*, now: dt.datetime | None = None) -> float | None:
    """Seconds since beat last showed life, or None if it never has."""
    at = Heartbeat.objects.filter(name=BEAT).values_list("at", flat=True).first()
    if at is None:
        return None
    return max(0.0, ((now or timezone.now()) - at).total_seconds())


def workers_seen(*, within_seconds: float | None = None) -> list[str]:
    """Hostnames of workers that showed life recently (newest first)."""
    since = timezone.now() - dt.timedelta(seconds=within_seconds or worker_max_age())
    names = Heartbeat.objects.filter(name__startswith=WORKER_PREFIX, at__gte=since).order_by("-at")
    return [n.removeprefix(WORKER_PREFIX) for n in names.values_list("name", flat=True)]


def _safely(name: str) -> None:
    # A savepoint if the host (beat's scheduler) is inside a transaction: a failed write must
    # roll back only itself.
    try:
        with transaction.atomic():
            heartbeat_record(name=name)
    except Exception:  # liveness reporting must never take its host down
        log.warning("could not record heartbeat %s", name, exc_info=True)
        if not connection.in_atomic_block:
            connection.close()  # reconnect on the next write


@beat_init.connect(dispatch_uid="edsmart-heartbeat-beat-init")
def _on_beat_init(sender: object = None, **kwargs: object) -> None:
    global _in_beat
    _in_beat = True
    _safely(BEAT)


@after_task_publish.connect(dispatch_uid="edsmart-heartbeat-beat-publish")
def _on_publish(sender: object = None, **kwargs: object) -> None:
    global _last_beat_write
    if not _in_beat:
        return
    now = time.monotonic()
    if now - _last_beat_write < BEAT_WRITE_INTERVAL_SECONDS:
        return
    _last_beat_write = now
    _safely(BEAT)


@worker_ready.connect(dispatch_uid="edsmart-heartbeat-worker-ready")
def _on_worker_ready(sender: object = None, **kwargs: object) -> None:
    hostname = getattr(sender, "hostname", None)
    if hostname:
        _safely(f"{WORKER_PREFIX}{hostname}")
