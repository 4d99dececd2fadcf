"""/healthz, /readyz and /metrics against the real database and Redis; heartbeats from real
beat and worker processes."""

from __future__ import annotations

import datetime as dt
import socket

import pytest
from django.db import connection
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from notifications import batch, dispatch, heartbeats, tasks
from notifications.models import Delivery, DeliveryStatus, Heartbeat
from slips.services import message_schedule
from tests import factories
from tests.smtp_server import free_port

S = DeliveryStatus
TOKEN = "metrics-token-for-tests-0123456789"


def fresh() -> None:
    heartbeats.heartbeat_record(name=heartbeats.BEAT)
    heartbeats.worker_record(hostname="w1@test")


def age(name: str, seconds: float) -> None:
    Heartbeat.objects.filter(name=name).update(at=timezone.now() - dt.timedelta(seconds=seconds))


def test_healthz_needs_nothing_but_the_process(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def with_token(settings) -> dict[str, str]:
    """/readyz shows its details only to a caller with the metrics token."""
    settings.EDSMART_METRICS_TOKEN = TOKEN
    return {"HTTP_AUTHORIZATION": f"Bearer {TOKEN}"}


@pytest.mark.django_db
def test_readyz_passes_when_everything_is_fresh(client, settings, redis_client):
    fresh()
    response = client.get("/readyz", **with_token(settings))
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"database", "redis", "beat", "workers"}
    assert body["checks"]["workers"]["workers"] == ["w1@test"]


@pytest.mark.django_db
def test_readyz_fails_on_a_stale_beat_and_says_so(client, settings, redis_client):
    settings.EDSMART_BEAT_MAX_AGE_SECONDS = 120
    fresh()
    age("beat", 300)
    response = client.get("/readyz", **with_token(settings))
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["beat"]["ok"] is False and "too old" in checks["beat"]["detail"]
    assert checks["database"]["ok"] and checks["redis"]["ok"] and checks["workers"]["ok"]
    age("beat", 60)
    assert client.get("/readyz").status_code == 200


@pytest.mark.django_db
def test_readyz_fails_when_no_worker_was_seen_recently(client, redis_client):
    fresh()
    age("worker:w1@test", 3600)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["workers"]["ok"] is False


@pytest.mark.django_db
def test_readyz_fails_when_redis_is_unreachable(client, settings):
    fresh()
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    response = client.get("/readyz", **with_token(settings))
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["redis"]["ok"] is False and "ConnectionError" in checks["redis"]["detail"]
    assert checks["database"]["ok"] is True


@pytest.mark.django_db
def test_readyz_tells_anyone_only_what_failed(client, settings):
    """No worker host names and no error texts (hosts, ports) without the token; the status
    code and which checks failed stay the same for everyone."""
    fresh()
    port = free_port()
    settings.REDIS_URL = f"redis://127.0.0.1:{port}/0"
    settings.EDSMART_METRICS_TOKEN = TOKEN
    for headers in ({}, {"HTTP_AUTHORIZATION": f"Bearer {TOKEN}x"}, {"HTTP_AUTHORIZATION": TOKEN}):
        response = client.get("/readyz", **headers)
        assert response.status_code == 503
        assert response.json() == {
            "status": "fail",
            "checks": {
                "database": {"ok": True},
                "redis": {"ok": False},
                "beat": {"ok": True},
                "workers": {"ok": True},
            },
        }
        body = response.content.decode()
        assert "w1@test" not in body and str(port) not in body and "Error" not in body
    detailed = client.get("/readyz", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").json()
    assert detailed["checks"]["workers"]["workers"] == ["w1@test"]
    assert str(port) in detailed["checks"]["redis"]["detail"]


@pytest.mark.django_db
def test_readyz_without_a_configured_token_shows_no_details_to_anyone(client, settings):
    fresh()
    settings.EDSMART_METRICS_TOKEN = ""
    response = client.get("/readyz", HTTP_AUTHORIZATION="Bearer ")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "checks": {name: {"ok": True} for name in ("database", "redis", "beat", "workers")},
    }


@pytest.mark.django_db
def test_heartbeat_task_records_the_worker_that_ran_it():
    tasks.heartbeat.apply()
    assert heartbeats.workers_seen() == [socket.gethostname()]


@pytest.mark.django_db
def test_metrics_is_absent_without_a_token(client, settings):
    settings.EDSMART_METRICS_TOKEN = ""
    assert (
        client.get("/metrics", secure=True, HTTP_AUTHORIZATION="Bearer anything").status_code == 404
    )


@pytest.mark.django_db
def test_metrics_refuses_a_missing_or_wrong_token(client, settings):
    settings.EDSMART_METRICS_TOKEN = TOKEN
    missing = client.get("/metrics", secure=True)
    assert missing.status_code == 401 and missing["WWW-Authenticate"].startswith("Bearer")
    assert (
        client.get("/metrics", secure=True, HTTP_AUTHORIZATION=f"Basic {TOKEN}").status_code == 401
    )
    assert (
        client.get("/metrics", secure=True, HTTP_AUTHORIZATION=f"Bearer {TOKEN}x").status_code
        == 403
    )
    assert client.get("/metrics", secure=True, HTTP_AUTHORIZATION="Bearer ").status_code == 401


def scrape(client) -> dict[tuple[str, tuple], float]:
    response = client.get("/metrics", secure=True, HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


@pytest.mark.django_db(transaction=True)
def test_metrics_show_real_counts(client, settings, school, smtp, redis_client):
    settings.EDSMART_METRICS_TOKEN = TOKEN
    fresh()
    age("beat", 42)
    for _ in range(5):
        factories.make_family(school=school)
    b = factories.make_broadcast(school=school)
    message_schedule(message=b, send_at=timezone.now())
    [mailing_id] = dispatch.dispatch_due()
    # Three of five go out; two wait, and were fanned out ten minutes ago.
    assert batch.batch_send(mailing_id=mailing_id, limit=3).sent == 3
    Delivery.objects.filter(status=S.PENDING).update(
        created_at=timezone.now() - dt.timedelta(minutes=10)
    )
    # Three nudges sit in the broker's "send" queue, published the way the pipeline does (the
    # full batch above already chained one; start from an empty queue to count exactly).
    redis_client.delete("send")
    for _ in range(3):
        tasks.send_batch.apply_async(args=[mailing_id])

    m = scrape(client)
    assert m[("edsmart_deliveries", (("status", "sent"),))] == 3
    assert m[("edsmart_deliveries", (("status", "pending"),))] == 2
    assert m[("edsmart_deliveries", (("status", "failed"),))] == 0
    assert m[("edsmart_backlog_deliveries", ())] == 2
    assert 590 < m[("edsmart_oldest_pending_age_seconds", ())] < 700
    assert m[("edsmart_sends_total", ())] == 3
    assert m[("edsmart_send_latency_seconds_bucket", (("le", "+Inf"),))] == 3
    assert m[("edsmart_send_latency_seconds_bucket", (("le", "60.0"),))] == 3
    assert m[("edsmart_send_latency_seconds_gcount", ())] == 3
    assert m[("edsmart_broker_up", ())] == 1
    assert m[("edsmart_broker_queue_length", (("queue", "send"),))] == 3
    assert m[("edsmart_broker_queue_length", (("queue", "periodic"),))] == 0
    assert 40 <= m[("edsmart_beat_heartbeat_age_seconds", ())] < 60
    assert m[("edsmart_workers_seen", ())] == 1

    # Values are read at scrape time: the next scrape sees the next send.
    batch.batch_send(mailing_id=mailing_id)
    m = scrape(client)
    assert m[("edsmart_deliveries", (("status", "sent"),))] == 5
    assert m[("edsmart_sends_total", ())] == 5
    assert m[("edsmart_backlog_deliveries", ())] == 0


@pytest.mark.django_db
def test_metrics_report_a_never_seen_beat_as_infinitely_old(client, settings, redis_client):
    settings.EDSMART_METRICS_TOKEN = TOKEN
    m = scrape(client)
    assert m[("edsmart_beat_heartbeat_age_seconds", ())] == float("inf")
    assert m[("edsmart_workers_seen", ())] == 0


@pytest.mark.workers
@pytest.mark.django_db(transaction=True)
def test_real_beat_and_worker_processes_write_their_heartbeats(client, redis_client):
    """Beat records itself when it publishes; a worker records itself when ready. Killing beat
    leaves the worker's heartbeat alone, so the two failures are told apart."""
    from tests.processes import Processes, RedisServer, database_url, scratch_dir, wait_until

    with scratch_dir("edsmart-heartbeats-") as workdir:
        broker = RedisServer(workdir=workdir).start()
        env = {
            "DATABASE_URL": database_url(connection.settings_dict),
            "REDIS_URL": broker.url,
            "SECRET_KEY": "heartbeat-tests-secret-key-not-used-anywhere-else-0123456789",
            "DEBUG": "0",
            "LOG_JSON": "0",
        }
        procs = Processes(workdir=workdir, env=env)
        try:
            worker = procs.worker("hb", concurrency=1)
            wait_until(
                lambda: heartbeats.workers_seen(),
                timeout=30,
                message="worker heartbeat",
                diagnostics=procs.tails,
            )
            assert heartbeats.workers_seen()[0].startswith("hb@")
            assert heartbeats.beat_age_seconds() is None
            beat = procs.beat("beat")
            wait_until(
                lambda: heartbeats.beat_age_seconds() is not None,
                timeout=30,
                message="beat heartbeat",
                diagnostics=procs.tails,
            )
            assert client.get("/readyz").status_code == 200, client.get("/readyz").json()
            beat.kill()
            worker.kill()
            assert heartbeats.beat_age_seconds() < 60
        finally:
            procs.stop_all()
            broker.stop()
