"""Ids on Sentry events: which school, message (mailing) and delivery an error belongs to.

Logs already carry these as ``extra`` fields (one JSON object a line when LOG_JSON is on).
Sentry needs them as tags, set on the scope that is current when an error is captured. With
SENTRY_DSN unset sentry_sdk has no client and these calls cost next to nothing.

- ``tag(...)`` for a whole task: Celery's Sentry integration gives each task its own
  isolation scope, so the tags end with the task.
- ``ids(...)`` around one item of a batch: a fresh scope, so one delivery's ids never stick
  to the next delivery's error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sentry_sdk

Id = int | str | None


def _present(values: dict[str, Id]) -> dict[str, str]:
    return {key: str(value) for key, value in values.items() if value is not None}


def tag(*, school_id: Id = None, mailing_id: Id = None, delivery_id: Id = None, **more: Id) -> None:
    """Tag the current isolation scope (the running task or request)."""
    sentry_sdk.set_tags(
        _present(
            {"school_id": school_id, "mailing_id": mailing_id, "delivery_id": delivery_id, **more}
        )
    )


@contextmanager
def ids(
    *, school_id: Id = None, mailing_id: Id = None, delivery_id: Id = None, **more: Id
) -> Iterator[None]:
    """Tag events captured inside the block only."""
    if not sentry_sdk.get_client().is_active():
        yield  # no Sentry: a scope per email would cost more than the rest of its bookkeeping
        return
    with sentry_sdk.new_scope() as scope:
        scope.set_tags(
            _present(
                {
                    "school_id": school_id,
                    "mailing_id": mailing_id,
                    "delivery_id": delivery_id,
                    **more,
                }
            )
        )
        yield
