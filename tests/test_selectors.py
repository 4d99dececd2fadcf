"""The read side: one definition of the backlog, which /metrics, the sending command, the ops
page and the backlog alert all report, so they agree on the same rows."""

from __future__ import annotations

import datetime as dt
import io
import json

import pytest
from django.core.management import call_command
from django.utils import timezone

from notifications import alerts, controls, selectors
from notifications.models import Delivery, DeliveryStatus, Mailing
from tests import factories
from tests.test_health_metrics import TOKEN, fresh, scrape

S = DeliveryStatus

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("web_settings")]


def _ago(minutes: float) -> dt.datetime:
    return timezone.now() - dt.timedelta(minutes=minutes)


@pytest.fixture
def mixed_backlog(school):
    """One sending mailing with a row in every state that a backlog definition could get
    wrong, and a paused mailing whose old rows are no backlog at all."""
    _, sending = factories.broadcast_dispatched(school=school, families=6)
    rows = list(Delivery.objects.filter(mailing_id=sending).order_by("pk"))
    pending, retry_due, retry_later, claimed, sent, unknown = rows
    Delivery.objects.filter(pk=pending.pk).update(created_at=_ago(10))
    # Fanned out 30 minutes ago, failed once, due again for 20 minutes: late by 20, not 30.
    Delivery.objects.filter(pk=retry_due.pk).update(
        status=S.RETRY_WAIT, created_at=_ago(30), next_attempt_at=_ago(20)
    )
    # Backing off until later: not late, however old.
    Delivery.objects.filter(pk=retry_later.pk).update(
        status=S.RETRY_WAIT, created_at=_ago(120), next_attempt_at=_ago(-5)
    )
    Delivery.objects.filter(pk=claimed.pk).update(status=S.CLAIMED, created_at=_ago(1))
    Delivery.objects.filter(pk=sent.pk).update(status=S.SENT, created_at=_ago(300))
    Delivery.objects.filter(pk=unknown.pk).update(status=S.UNKNOWN, created_at=_ago(300))

    _, paused = factories.broadcast_dispatched(school=school, families=2)
    controls.mailing_set_paused(mailing=Mailing.objects.get(pk=paused), paused=True)
    Delivery.objects.filter(mailing_id=paused).update(created_at=_ago(600))
    return school


def test_backlog_counts_due_rows_of_sending_mailings_aged_from_when_they_became_due(
    mixed_backlog,
):
    backlog = selectors.backlog()
    assert backlog.deliveries == 3  # pending, retry past its back-off, claimed
    assert 20 * 60 - 5 < backlog.oldest_due_seconds < 20 * 60 + 30


def test_metrics_the_sending_command_and_the_backlog_alert_agree(
    mixed_backlog, client, settings, redis_client
):
    settings.EDSMART_METRICS_TOKEN = TOKEN
    fresh()
    metrics = scrape(client)
    stats = selectors.school_stats()[mixed_backlog.pk]

    out = io.StringIO()
    call_command("sending", "status", "--json", stdout=out)
    command = json.loads(out.getvalue())

    assert metrics[("edsmart_backlog_deliveries", ())] == stats.backlog == command["backlog"] == 3
    ages = [
        metrics[("edsmart_oldest_pending_age_seconds", ())],
        stats.oldest_due_seconds,
        command["oldest_pending_seconds"],
    ]
    assert max(ages) - min(ages) < 5, ages

    # The alert fires exactly when the age every reader reports passes its threshold.
    settings.EDSMART_ALERT_BACKLOG_SECONDS = min(ages) - 60
    assert f"backlog:school:{mixed_backlog.pk}" in alerts.watch().raised
    settings.EDSMART_ALERT_BACKLOG_SECONDS = max(ages) + 60
    assert f"backlog:school:{mixed_backlog.pk}" in alerts.watch().cleared
