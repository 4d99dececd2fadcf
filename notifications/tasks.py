"""Thin Celery tasks: take ids, call the pipeline's modules. No logic lives here (CONVENTIONS.md).

Names are explicit and stable: queued messages outlive a deploy, and ``nudges`` publishes
``send_batch`` by name.
"""

from __future__ import annotations

import logging

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings

# heartbeats is imported for its Celery signal receivers: beat and workers import this module.
from notifications import (
    alerts,
    batch,
    dispatch,
    heartbeats,
    log_context,
    nudges,
    retention,
    sweep,
)

log = logging.getLogger("edsmart.pipeline")


@shared_task(name="notifications.tasks.send_batch")
def send_batch(mailing_id: int | None = None) -> dict:
    """Takes turns across every listed mailing (``mailing_id`` is only the nudge's hint)."""
    log_context.tag(mailing_id=mailing_id)
    return batch.turns_send(hint=mailing_id, between_turns=periodic_duties).__dict__


def periodic_duties() -> None:
    """Beat's dispatch and sweep, also run between a send batch's turns when it is their time.

    At peak every worker process is busy in a send batch for a minute at a time, and beat's
    ``dispatch_due`` and ``sweep`` tasks wait in the queue behind them: a bench run saw slips
    fanned out 10 s after they fell due. Batches therefore take these duties themselves, one
    batch in the fleet per interval (a Redis key), so that a due message is picked up within
    about a second however busy the workers are. Both are safe to run anywhere, at any time,
    twice at once.
    """
    try:
        # Twice per beat interval: a due message waits half a second on average, not a whole.
        if nudges.take_duty("dispatch", every=settings.EDSMART_DISPATCH_INTERVAL_SECONDS / 2):
            dispatch.dispatch_due()
        if nudges.take_duty("sweep", every=settings.EDSMART_SWEEP_INTERVAL_SECONDS):
            sweep.sweep()
    except SoftTimeLimitExceeded:
        raise  # the task is being told to stop: the batch must hear it
    except Exception:
        # Beat's own tasks still run these; a failure here must not end the batch's sending.
        log.exception("a periodic duty failed between send turns")


@shared_task(name="notifications.tasks.dispatch_due")
def dispatch_due() -> list[int]:
    return dispatch.dispatch_due()


@shared_task(name="notifications.tasks.sweep")
def sweep_task() -> dict:
    return sweep.sweep().__dict__


@shared_task(name="notifications.tasks.history_prune")
def history_prune() -> dict:
    return retention.history_prune().__dict__


@shared_task(name="notifications.tasks.watch")
def watch() -> dict:
    return alerts.watch().as_dict()


@shared_task(name="notifications.tasks.heartbeat", bind=True)
def heartbeat(self) -> str:
    """Scheduled by beat; whichever worker runs it shows it is alive."""
    heartbeats.worker_record(hostname=self.request.hostname or "unknown")
    return self.request.hostname or "unknown"
