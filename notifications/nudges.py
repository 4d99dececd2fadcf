"""Nudges: Celery messages that tell a worker "there may be work for this mailing".

A nudge lists the mailing in the fair-share turns (``fairshare``) and publishes send-batch
tasks; a batch then serves whichever mailing's turn it is, not necessarily the one that
nudged it. They are hints, never the truth. Publishing one may fail (Redis restarting), be
lost (Redis flushed) or be delivered twice (visibility timeout); none of that matters,
because the send batch re-reads the database and the sweeper re-nudges any mailing whose
claimable rows have had no live batch for a while. The small Redis markers here only keep
the sweeper from flooding the queue while batches are alive.
"""

from __future__ import annotations

import logging
import math

import redis
from celery import current_app
from django.conf import settings

from edsmart.redis_client import redis_client
from notifications import fairshare, selectors

log = logging.getLogger("edsmart.nudges")

# Published by name: the task module calls into the pipeline, which calls in here, and
# naming the task rather than importing it keeps that loop out of the import graph.
SEND_BATCH_TASK = "notifications.tasks.send_batch"


def _alive_key(mailing_id: int) -> str:
    return f"edsmart:batch-alive:{mailing_id}"


def _nudged_key(mailing_id: int) -> str:
    return f"edsmart:nudged:{mailing_id}"


def batches_for(total: int | None) -> int:
    if total is None:
        return settings.EDSMART_BATCH_PARALLELISM
    return min(
        settings.EDSMART_BATCH_PARALLELISM, max(1, math.ceil(total / settings.EDSMART_BATCH_SIZE))
    )


def mark_alive(mailing_id: int) -> None:
    """A batch holds claims of this mailing. Lives one claim lease: the batch's lease keeper
    renews it with the leases, so it lapses with them when the batch dies."""
    ttl = max(1, round(settings.EDSMART_CLAIM_LEASE_SECONDS))
    try:
        redis_client().set(_alive_key(mailing_id), 1, ex=ttl)
    except redis.RedisError:
        log.warning("could not mark mailing %s alive in Redis", mailing_id, exc_info=True)


def forget(mailing_id: int | None) -> None:
    """A batch of this mailing died with the database: drop its markers, so that the first
    sweep after the database is back nudges at once instead of waiting them out (a soak run
    saw sending stop for up to 17 s after a 3 s restart, every nudge having failed at once)."""
    if mailing_id is None:
        return
    try:
        redis_client().delete(_alive_key(mailing_id), _nudged_key(mailing_id))
    except redis.RedisError:
        log.warning("could not clear the markers of mailing %s in Redis", mailing_id)


def list_for_turns(
    mailing_id: int, *, school_id: int | None = None, urgent: bool | None = None
) -> None:
    """List a mailing in the fair-share turns (looked up when the caller does not know its
    school). Failures are logged and swallowed: the sweeper lists it again."""
    if school_id is None or urgent is None:
        keys = selectors.mailing_turn_keys(mailing_id)
        if keys is None:
            return
        school_id, urgent = keys
    try:
        fairshare.activate(mailing_id=mailing_id, school_id=school_id, urgent=urgent)
    except redis.RedisError:
        log.warning("could not list mailing %s for turns in Redis", mailing_id, exc_info=True)


def take_duty(name: str, *, every: float) -> bool:
    """True for the one caller in the fleet that takes duty ``name`` in this period of
    ``every`` seconds (a Redis key set only if absent, expiring after the period)."""
    try:
        return bool(redis_client().set(f"edsmart:duty:{name}", 1, nx=True, px=int(every * 1000)))
    except redis.RedisError:
        return False


def enqueue_batches(mailing_id: int | None, total: int | None) -> int:
    """List the mailing for turns and publish send-batch tasks. Failures are logged and
    swallowed: the sweeper retries."""
    if total == 0:
        return 0
    if mailing_id is not None:
        list_for_turns(mailing_id)
    return _publish(mailing_id, batches_for(total))


def _publish(mailing_id: int | None, count: int) -> int:
    sent = 0
    for _ in range(count):
        try:
            current_app.send_task(
                SEND_BATCH_TASK,
                args=[mailing_id],
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
            )
            sent += 1
        except Exception:
            log.warning("could not enqueue a batch for mailing %s", mailing_id, exc_info=True)
            break
    if sent and mailing_id is not None:
        try:
            redis_client().set(
                _nudged_key(mailing_id), 1, ex=int(settings.EDSMART_SWEEP_STALE_SECONDS)
            )
        except redis.RedisError:
            log.warning("could not record the nudge for mailing %s", mailing_id, exc_info=True)
    return sent


def nudge_stalled(*, force: bool = False) -> int:
    """List every sending mailing with due rows for turns (a retry fell due, claims came
    back, Redis restarted empty), and enqueue batches for those with no sign of a live batch."""
    nudged = 0
    for mailing_id, school_id, urgent in selectors.mailings_with_claimable_work():
        list_for_turns(mailing_id, school_id=school_id, urgent=urgent)
        if not force:
            try:
                client = redis_client()
                if client.exists(_alive_key(mailing_id)) or client.exists(_nudged_key(mailing_id)):
                    continue
            except redis.RedisError:
                log.warning("Redis unavailable; nudging mailing %s anyway", mailing_id)
        nudged += _publish(mailing_id, batches_for(None)) > 0
    return nudged
