"""Thin Celery tasks of the school domain: take ids, call a service (CONVENTIONS.md).

The name is explicit and stable: ``slips.roster_imports`` publishes it by name, and a queued
message outlives a deploy. Routed to the ``periodic`` queue (settings ``CELERY_TASK_ROUTES``),
away from the send batches.
"""

from __future__ import annotations

from celery import shared_task

from slips import roster_imports


# A large roster is one transaction of tens of thousands of rows: give it longer than the
# default limits (still far below the broker's visibility timeout, so it is not redelivered
# while it runs). Past them the transaction rolls back and nothing is imported.
@shared_task(name="slips.tasks.roster_import_run", soft_time_limit=900, time_limit=960)
def roster_import_run(import_id: int) -> bool:
    """Imports a confirmed roster upload; does nothing for one no longer queued."""
    return roster_imports.roster_import_run(import_id=import_id)
