"""Thin Celery tasks: take ids, call the pipeline's modules. No logic lives here (CONVENTIONS.md).

Names are explicit and stable: queued messages outlive a deploy, and ``nudges`` publishes
``send_batch`` by name.
"""

from __future__ import annotations

from celery import shared_task

# heartbeats is imported for its Celery signal receivers: beat and workers import this module.
from notifications import alerts, batch, dispatch, heartbeats, log_context, sweep


@shared_task(name="notifications.tasks.send_batch")
def send_batch(mailing_id: int | None = None) -> dict:
    """Takes turns across every listed mailing (``mailing_id`` is only the nudge's hint)."""
    log_context.tag(mailing_id=mailing_id)
    return batch.turns_send(hint=mailing_id).__dict__


@shared_task(name="notifications.tasks.dispatch_due")
def dispatch_due() -> list[int]:
    return dispatch.dispatch_due()


@shared_task(name="notifications.tasks.sweep")
def sweep_task() -> dict:
    return sweep.sweep().__dict__


@shared_task(name="notifications.tasks.watch")
def watch() -> dict:
    return alerts.watch().as_dict()


@shared_task(name="notifications.tasks.heartbeat", bind=True)
def heartbeat(self) -> str:
    """Scheduled by beat; whichever worker runs it shows it is alive."""
    heartbeats.worker_record(hostname=self.request.hostname or "unknown")
    return self.request.hostname or "unknown"
