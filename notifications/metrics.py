"""Prometheus metrics, read fresh from the database and the broker at every scrape.

Nothing is counted in process: web, worker and beat processes each have their own memory,
so an in-process counter would show one gunicorn worker's share. The database already records
every send (each delivery row's ``accepted`` count), so the send counter and the latency
distribution are derived from it at scrape time:

- ``edsmart_sends_total`` sums the accepted sends of closed mailings' summaries and of open
  mailings' rows, in one statement; ``rate()`` of it is the send rate. Retention keeps the
  summaries, so it never goes down.
- ``edsmart_send_latency_seconds`` is a *gauge histogram* (fan-out to acceptance) over the
  deliveries sent in the last ``EDSMART_METRICS_LATENCY_WINDOW_SECONDS``: a current
  distribution, so use ``histogram_quantile`` on the buckets directly, without ``rate()``.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Iterator

import redis
from django.conf import settings
from django.db import connection
from django.db.models import Count
from django.utils import timezone
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    Metric,
)

from edsmart.redis_client import redis_client
from notifications import fairshare, heartbeats, ratelimit, selectors, summaries
from notifications.models import Alert, Delivery

log = logging.getLogger("edsmart.metrics")

QUEUES = ("send", "periodic")
LATENCY_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600)


def latency_window() -> float:
    return float(settings.EDSMART_METRICS_LATENCY_WINDOW_SECONDS)


def send_latency(*, window_seconds: float) -> tuple[list[int], int, float]:
    """Cumulative bucket counts, total count and sum of (sent_at - created_at), one query."""
    table = Delivery._meta.db_table
    lat = "EXTRACT(EPOCH FROM (sent_at - created_at))"
    buckets = ", ".join(f"count(*) FILTER (WHERE {lat} <= %s)" for _ in LATENCY_BUCKETS)
    # Only rows of mailings open within the window can have been sent in it: read through
    # the (mailing, status) index, not the whole year.
    sql = f"""
        SELECT {buckets}, count(*), coalesce(sum({lat}), 0) FROM {table}
        WHERE mailing_id = ANY(%s) AND status = 'sent' AND sent_at >= %s
    """  # noqa: S608 - the table name comes from model _meta; values are parameters
    since = timezone.now() - dt.timedelta(seconds=window_seconds)
    mailing_ids = summaries.mailing_ids_open_since(since)
    with connection.cursor() as cur:
        cur.execute(sql, [*LATENCY_BUCKETS, mailing_ids, since])
        row = cur.fetchone()
    return [int(n) for n in row[: len(LATENCY_BUCKETS)]], int(row[-2]), float(row[-1])


def queue_lengths() -> dict[str, int] | None:
    """Messages waiting in the Celery queues (Redis lists), or None if Redis is unreachable."""
    client = redis_client()
    try:
        return {queue: int(client.llen(queue)) for queue in QUEUES}
    except redis.RedisError:
        log.warning("metrics: Redis unreachable", exc_info=True)
        return None


class PipelineCollector:
    """A custom collector: every ``collect`` runs the queries, so values are never stale."""

    def collect(self) -> Iterator[Metric]:
        # One snapshot for both: closed mailings' summaries and open mailings' rows.
        counts, sends = summaries.status_totals()
        by_status = GaugeMetricFamily(
            "edsmart_deliveries", "Deliveries by status (all time).", labels=["status"]
        )
        for status, n in counts.items():
            by_status.add_metric([status], n)
        yield by_status

        backlog = selectors.backlog()
        yield GaugeMetricFamily(
            "edsmart_backlog_deliveries",
            "Deliveries of sending mailings that are due and not yet started "
            "(pending, claimed, or waiting to retry past their back-off).",
            value=backlog.deliveries,
        )
        yield GaugeMetricFamily(
            "edsmart_oldest_pending_age_seconds",
            "Seconds the oldest backlog delivery has been due (0 when there is none).",
            value=backlog.oldest_due_seconds or 0.0,
        )

        yield CounterMetricFamily(
            "edsmart_sends",
            "Accepted sends recorded, archived mailings included (only grows).",
            value=sends,
        )

        counts, total, total_sum = send_latency(window_seconds=latency_window())
        hist = GaugeHistogramMetricFamily(
            "edsmart_send_latency_seconds",
            "Fan-out to acceptance, for deliveries sent within the latency window.",
            buckets=[
                *((str(float(b)), n) for b, n in zip(LATENCY_BUCKETS, counts, strict=True)),
                ("+Inf", total),
            ],
            gsum_value=total_sum,
        )
        yield hist

        lengths = queue_lengths()
        yield GaugeMetricFamily(
            "edsmart_broker_up", "1 if Redis answered this scrape.", value=int(lengths is not None)
        )
        queue = GaugeMetricFamily(
            "edsmart_broker_queue_length", "Messages waiting in a Celery queue.", labels=["queue"]
        )
        for name, n in (lengths or {}).items():
            queue.add_metric([name], n)
        yield queue

        age = heartbeats.beat_age_seconds()
        yield GaugeMetricFamily(
            "edsmart_beat_heartbeat_age_seconds",
            "Seconds since celery beat last showed life (+Inf if never).",
            value=math.inf if age is None else age,
        )
        yield GaugeMetricFamily(
            "edsmart_workers_seen",
            "Celery workers that showed life within EDSMART_WORKER_MAX_AGE_SECONDS.",
            value=len(heartbeats.workers_seen()),
        )

        yield from _rate_metrics()

        alerts = GaugeMetricFamily(
            "edsmart_alerts_open", "Open alerts by severity.", labels=["severity"]
        )
        open_counts = dict(
            Alert.objects.filter(cleared_at__isnull=True)
            .order_by()
            .values_list("severity")
            .annotate(n=Count("id"))
        )
        for severity in Alert.Severity.values:
            alerts.add_metric([severity], open_counts.get(severity, 0))
        yield alerts


def _rate_metrics() -> Iterator[Metric]:
    """The shared send rate and the fair-share turns (both kept in Redis)."""
    rate = ratelimit.state()
    yield GaugeMetricFamily(
        "edsmart_send_rate_cap", "EDSMART_SEND_RATE, emails/s (0 = no cap).", value=rate.cap
    )
    yield GaugeMetricFamily(
        "edsmart_send_rate_effective",
        "The send rate in force now, emails/s: the cap, or lower while backing off after a "
        "provider's throttling reply (0 = no limit).",
        value=rate.effective,
    )
    yield GaugeMetricFamily(
        "edsmart_send_rate_backed_off",
        "1 while a throttling reply holds the rate below its ceiling.",
        value=int(rate.backed_off),
    )
    yield CounterMetricFamily(
        "edsmart_throttle_replies",
        "Throttling replies from the provider (SMTP 421/451/452, API 429) since Redis started.",
        value=rate.throttles,
    )
    turns = fairshare.queue()
    waiting = GaugeMetricFamily(
        "edsmart_turns_waiting",
        "Mailings and schools listed for send turns.",
        labels=["lane"],
    )
    if turns is not None:
        waiting.add_metric(["urgent"], turns.urgent)
        waiting.add_metric(["schools"], turns.schools)
    yield waiting


registry = CollectorRegistry(auto_describe=False)
registry.register(PipelineCollector())


def render() -> bytes:
    return generate_latest(registry)
