"""The watch: every alert fires on its condition made real, stays quiet otherwise, is raised
once while open, clears when the condition goes, and the duplicate circuit breaker pauses."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
import sentry_sdk
from django.db import connection
from django.db.models import F
from django.utils import timezone
from sentry_sdk.transport import Transport

from notifications import alerts, batch, controls, heartbeats, sweep, transitions
from notifications.models import Alert, Delivery, DeliveryStatus, SendingSwitch
from slips.models import Guardian, School
from tests import factories

S = DeliveryStatus
OPS = ["ops@edsmart.example", "oncall@edsmart.example"]


@pytest.fixture
def ops(settings, mailoutbox):
    """Alerts mailed to two ops addresses through Django's locmem backend (parents' mail may
    go to the real SMTP server meanwhile)."""
    settings.EDSMART_ALERT_EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    settings.EDSMART_OPS_EMAILS = OPS
    return mailoutbox


def alive(*, beat_age: float = 0, worker_age: float = 0) -> None:
    """Beat and one worker showed life ``*_age`` seconds ago."""
    heartbeats.heartbeat_record(name=heartbeats.BEAT)
    heartbeats.worker_record(hostname="w1@test")
    now = timezone.now()
    from notifications.models import Heartbeat

    Heartbeat.objects.filter(name="beat").update(at=now - dt.timedelta(seconds=beat_age))
    Heartbeat.objects.filter(name="worker:w1@test").update(
        at=now - dt.timedelta(seconds=worker_age)
    )


def dispatched(school, families: int = 3) -> int:
    return factories.broadcast_dispatched(school=school, families=families)[1]


def drain(mailing_id: int | None = None) -> None:
    for _ in range(20):
        if not batch.batch_send(mailing_id=mailing_id).claimed:
            break


def open_keys() -> set[str]:
    return set(Alert.objects.filter(cleared_at__isnull=True).values_list("key", flat=True))


@pytest.mark.django_db(transaction=True)
def test_quiet_when_all_is_well(school, smtp, redis_client, ops):
    alive()
    drain(dispatched(school, families=12))
    report = alerts.watch()
    assert report.raised == [] and open_keys() == set()
    assert ops == []
    assert Delivery.objects.filter(status=S.SENT).count() == 12


@pytest.mark.django_db
def test_stopped_beat_alerts_once_and_clears_when_beat_returns(ops):
    alive(beat_age=600)
    report = alerts.watch()
    assert report.raised == ["beat_silent"]
    assert len(ops) == 1 and ops[0].to == OPS and "beat is silent" in ops[0].subject
    # A second run while beat is still silent: same open alert, nobody mailed again.
    assert alerts.watch().still_open == ["beat_silent"]
    assert Alert.objects.filter(key="beat_silent").count() == 1 and len(ops) == 1
    alive()
    assert alerts.watch().cleared == ["beat_silent"]
    assert open_keys() == set() and Alert.objects.get(key="beat_silent").cleared_at is not None
    # Silent again later: a new condition, a new alert and a new email.
    alive(beat_age=600)
    assert alerts.watch().raised == ["beat_silent"]
    assert Alert.objects.filter(key="beat_silent").count() == 2 and len(ops) == 2


@pytest.mark.django_db
def test_beat_never_seen_is_silent(ops):
    heartbeats.worker_record(hostname="w1@test")
    assert alerts.watch().raised == ["beat_silent"]


@pytest.mark.django_db
def test_no_worker_seen_alerts(ops):
    alive(worker_age=3600)
    assert alerts.watch().raised == ["workers_silent"]
    alive()
    assert alerts.watch().cleared == ["workers_silent"]


@pytest.mark.django_db
def test_old_backlog_alerts_and_a_fresh_one_does_not(school, other_school, settings, ops):
    settings.EDSMART_ALERT_BACKLOG_SECONDS = 600
    alive()
    old = dispatched(school)
    dispatched(other_school)  # created just now: under the threshold
    assert alerts.watch().raised == []
    Delivery.objects.filter(mailing_id=old).update(
        created_at=timezone.now() - dt.timedelta(minutes=30)
    )
    report = alerts.watch()
    assert report.raised == [f"backlog:school:{school.pk}"]
    alert = Alert.objects.get(key=f"backlog:school:{school.pk}")
    assert alert.school == school and "3 deliveries due" in alert.message
    assert len(ops) == 1


@pytest.mark.django_db
def test_retry_wait_not_yet_due_is_not_a_late_backlog(school, settings, ops):
    settings.EDSMART_ALERT_BACKLOG_SECONDS = 600
    alive()
    mailing_id = dispatched(school)
    Delivery.objects.filter(mailing_id=mailing_id).update(
        status=S.RETRY_WAIT,
        created_at=timezone.now() - dt.timedelta(hours=2),
        next_attempt_at=timezone.now() + dt.timedelta(minutes=5),
    )
    assert alerts.watch().raised == []


@pytest.mark.django_db
def test_unknown_outcome_alerts_until_resolved(school, redis_client, ops):
    alive()
    mailing_id = dispatched(school, families=2)
    # A worker claims and starts a send, then vanishes: its lease runs out mid-submit.
    [first, _] = transitions.deliveries_claim(limit=2, mailing_id=mailing_id)
    assert transitions.delivery_start(claimed=first)
    Delivery.objects.filter(pk=first.id).update(lease_until=timezone.now() - dt.timedelta(1))
    assert sweep.sweep().submits_expired == 1
    assert Delivery.objects.get(pk=first.id).status == S.UNKNOWN

    assert alerts.watch().raised == [f"unknown:school:{school.pk}"]
    assert "1 deliveries with an unknown outcome" in ops[0].subject
    controls.unknowns_resolve(delivery_ids=[first.id], resolution="failed", actor="ops")
    assert alerts.watch().cleared == [f"unknown:school:{school.pk}"]


@pytest.mark.django_db(transaction=True)
def test_failure_rate_over_threshold_alerts(
    school, other_school, smtp, redis_client, settings, ops
):
    settings.EDSMART_ALERT_FAILURE_RATE = 0.2
    settings.EDSMART_ALERT_FAILURE_MIN_COUNT = 10
    alive()
    drain(dispatched(school, families=8))  # 8 accepted
    assert alerts.watch().raised == []
    smtp.handler.behaviour.rcpt_reply = "550 5.1.1 no such user"
    drain(dispatched(other_school, families=4))  # 4 refused for good: 4 / 12 = 33%
    assert Delivery.objects.filter(status=S.FAILED).count() == 4
    assert alerts.watch().raised == ["failure_rate"]
    assert "33% of sends failed" in ops[0].subject


@pytest.mark.django_db(transaction=True)
def test_few_failures_under_the_minimum_volume_stay_quiet(school, smtp, redis_client, ops):
    alive()
    smtp.handler.behaviour.rcpt_reply = "550 5.1.1 no such user"
    drain(dispatched(school, families=2))
    assert Delivery.objects.filter(status=S.FAILED).count() == 2
    assert alerts.watch().raised == []


def _duplicate_one(school) -> Delivery:
    drain(dispatched(school, families=2))
    d = Delivery.objects.filter(mailing__school=school, status=S.SENT).first()
    # What must never happen: a second accepted send recorded for the same delivery.
    Delivery.objects.filter(pk=d.pk).update(accepted=F("accepted") + 1)
    return d


@pytest.mark.django_db(transaction=True)
def test_duplicate_trips_the_circuit_breaker_for_that_school_only(
    school, other_school, smtp, redis_client, ops
):
    alive()
    drain(dispatched(other_school, families=2))
    d = _duplicate_one(school)
    report = alerts.watch()
    [key] = report.raised
    assert key.startswith(f"duplicate:{d.mailing_id}:")
    assert report.breaker_tripped == [school.pk]
    assert School.objects.get(pk=school.pk).sending_paused
    assert not School.objects.get(pk=other_school.pk).sending_paused
    assert not SendingSwitch.objects.filter(pk=1, paused=True).exists()
    alert = Alert.objects.get(key=key)
    assert alert.severity == Alert.Severity.CRITICAL and alert.school == school
    assert len(ops) == 1 and "DUPLICATE" in ops[0].subject
    # A paused school claims nothing: new work waits.
    mailing_id = dispatched(school, families=1)
    assert batch.batch_send(mailing_id=mailing_id).claimed == 0

    # Ops investigate and resume; the alert stays open as the record, the breaker stays off.
    controls.sending_set_paused(paused=False, actor="ops", school=school)
    assert alerts.watch().raised == []
    assert not School.objects.get(pk=school.pk).sending_paused and len(ops) == 1

    # A *new* duplicated pair trips it again.
    other = Delivery.objects.filter(mailing__school=school, status=S.SENT).exclude(pk=d.pk).first()
    Delivery.objects.filter(pk=other.pk).update(accepted=F("accepted") + 1)
    assert alerts.watch().breaker_tripped == [school.pk]
    assert School.objects.get(pk=school.pk).sending_paused


@pytest.mark.django_db(transaction=True)
def test_two_watches_at_once_raise_and_mail_once(ops):
    alive(beat_age=600)
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            barrier.wait(timeout=10)
            alerts.watch()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert Alert.objects.filter(key="beat_silent").count() == 1
    assert len(ops) == 1


@pytest.mark.django_db
def test_failed_email_is_retried_by_the_next_watch(settings, mailoutbox):
    from tests.smtp_server import free_port

    settings.EDSMART_OPS_EMAILS = OPS
    settings.EDSMART_ALERT_EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = "127.0.0.1", free_port(), 1
    alive(beat_age=600)
    assert alerts.watch().notified == 0  # nothing listens on that port
    assert not Alert.objects.get(key="beat_silent").notified
    settings.EDSMART_ALERT_EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    assert alerts.watch().notified == 1
    assert len(mailoutbox) == 1 and Alert.objects.get(key="beat_silent").notified
    assert alerts.watch().notified == 0


class KeepingTransport(Transport):
    """Sentry's own transport interface, keeping events in memory instead of posting them."""

    events: list[dict] = []

    def capture_envelope(self, envelope) -> None:
        for item in envelope.items:
            if item.type == "event":
                self.events.append(item.payload.json)


@pytest.fixture
def sentry_events():
    """A real Sentry client (as SENTRY_DSN would set up) with an in-memory transport."""
    events = KeepingTransport.events = []
    sentry_sdk.init(
        dsn="https://public@sentry.invalid/1",
        transport=KeepingTransport,
        default_integrations=False,
        auto_enabling_integrations=False,
    )
    yield events
    sentry_sdk.get_client().close()
    sentry_sdk.init()  # no DSN: back to the disabled client


@pytest.mark.django_db
def test_alerts_go_to_sentry_with_the_school_tagged(school, ops, sentry_events):
    alive()
    mailing_id = dispatched(school, families=1)
    Delivery.objects.filter(mailing_id=mailing_id).update(status=S.UNKNOWN)
    alerts.watch()
    sentry_sdk.flush()
    [event] = sentry_events
    assert event["tags"]["school_id"] == str(school.pk)
    assert event["tags"]["alert_kind"] == "unknown"
    assert event["level"] == "warning"
    alerts.watch()
    sentry_sdk.flush()
    assert len(sentry_events) == 1


@pytest.mark.django_db
def test_no_ops_addresses_means_no_email_but_the_alert_still_shows(settings, mailoutbox):
    settings.EDSMART_OPS_EMAILS = []
    alive(worker_age=3600)
    assert alerts.watch().raised == ["workers_silent"]
    assert mailoutbox == [] and open_keys() == {"workers_silent"}


def test_guardian_model_still_has_suppression_fields():
    # The webhooks write these; a rename would silently break suppression.
    names = {f.name for f in Guardian._meta.get_fields()}
    assert {"suppressed_at", "suppressed_reason"} <= names


def test_log_context_ids_tag_sentry_events_inside_the_block_only(sentry_events):
    from notifications import log_context

    with log_context.ids(school_id=3, mailing_id=41, delivery_id=None):
        sentry_sdk.capture_message("inside")
    sentry_sdk.capture_message("outside")
    sentry_sdk.flush()
    inside, outside = sentry_events
    assert inside["tags"] == {"school_id": "3", "mailing_id": "41"}
    assert "school_id" not in outside.get("tags", {})
