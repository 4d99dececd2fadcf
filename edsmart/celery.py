"""The Celery app. Configuration comes from Django settings under the CELERY_ namespace.

Database connections in workers: with ``CELERY_DB_REUSE_MAX`` set (it is, for speed), Celery's
Django fixup keeps a task's connection for the next task and never notices that it broke, so
after a PostgreSQL restart or failover every task failed on the dead connection until the pool
child was recycled. Django's own ``close_old_connections``, run around every task as it is
around every request, drops a connection that raised an error and no longer answers (and, with
``CONN_HEALTH_CHECKS``, checks a reused one before its first query).

Queues: the routes in settings send the email batches to ``send`` and everything else to
``periodic`` (the default queue). A worker started without ``-Q`` consumes the queues in
``task_queues``, which Celery otherwise makes of the default queue alone: such a worker, started
as Celery's documentation shows, ran the dispatcher for ever and never sent an email. So every
queue the settings route to is declared here, as Celery would have declared it for a publish
(a direct exchange and routing key of the queue's own name), and ``-Q`` only narrows the set.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from celery import Celery
from celery.signals import task_postrun, task_prerun
from django.db import close_old_connections
from kombu import Exchange, Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "edsmart.settings")


def routed_queue_names(conf: Mapping[str, Any]) -> list[str]:
    """The default queue, then each queue a route of ``task_routes`` names, once each.

    Routes here are a mapping of task name (or glob) to options, as in settings; a router
    function can name only queues declared by other means, so it adds none.
    """
    names = [conf["task_default_queue"]]
    routes = conf["task_routes"]
    for route in routes.values() if isinstance(routes, Mapping) else ():
        queue = route.get("queue") if isinstance(route, Mapping) else None
        if isinstance(queue, str) and queue not in names:
            names.append(queue)
    return names


def declared_queues(conf: Mapping[str, Any]) -> tuple[Queue, ...]:
    return tuple(
        Queue(name, Exchange(name, type="direct"), routing_key=name)
        for name in routed_queue_names(conf)
    )


def _declare_routed_queues(sender: Celery, source: Mapping[str, Any], **_: object) -> None:
    # Run once Django's settings are read (lazily, on first use), so the routes are the
    # settings' own. Settings that declare CELERY_TASK_QUEUES themselves are left as they are.
    if not source["task_queues"]:
        sender.conf.task_queues = declared_queues(source)


app = Celery("edsmart")
# Connected before any configuration can be read, so that it cannot be missed.
app.on_after_configure.connect(_declare_routed_queues, sender=app, weak=False)
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
