"""The Celery app. Configuration comes from Django settings under the CELERY_ namespace.

Database connections in workers: with ``CELERY_DB_REUSE_MAX`` set (it is, for speed), Celery's
Django fixup keeps a task's connection for the next task and never notices that it broke, so
after a PostgreSQL restart or failover every task failed on the dead connection until the pool
child was recycled. Django's own ``close_old_connections``, run around every task as it is
around every request, drops a connection that raised an error and no longer answers (and, with
``CONN_HEALTH_CHECKS``, checks a reused one before its first query).
"""

from __future__ import annotations

import os

from celery import Celery
from celery.signals import task_postrun, task_prerun
from django.db import close_old_connections

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "edsmart.settings")

app = Celery("edsmart")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@task_prerun.connect(dispatch_uid="edsmart-db-before-task")
@task_postrun.connect(dispatch_uid="edsmart-db-after-task")
def _drop_broken_db_connections(sender: object = None, **_: object) -> None:
    # Not for a task run eagerly inside another process's work (a test's transaction, say):
    # Celery's own fixup skips those too.
    if getattr(getattr(sender, "request", None), "is_eager", False):
        return
    close_old_connections()
