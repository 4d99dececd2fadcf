"""The superusers' ops page: per-school state and problems, alerts, and the pause switches."""

from __future__ import annotations

import datetime as dt

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from notifications import alerts, controls, dispatch, heartbeats
from notifications.models import Alert, Delivery, DeliveryStatus, SendingSwitch
from slips.models import School
from slips.services import message_schedule
from tests import factories

pytestmark = pytest.mark.django_db
S = DeliveryStatus


@pytest.fixture(autouse=True)
def plain_static(settings):
    """No collectstatic manifest in tests; the admin templates still need static URLs."""
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


@pytest.fixture
def superuser(client):
    user = get_user_model().objects.create_superuser("root", "root@example.org", "pw-tests-only")
    client.force_login(user)
    return user


def get(client, url: str = "/ops/"):
    return client.get(url, secure=True)


def post(client, **data: str):
    return client.post("/ops/sending/", data=data, secure=True)


def test_anonymous_is_sent_to_the_login_page(client):
    response = get(client)
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_staff_who_are_not_superusers_are_forbidden(client, school):
    client.force_login(factories.make_staff(school=school))
    assert get(client).status_code == 403
    assert post(client, scope="global", action="pause").status_code == 403
    assert not SendingSwitch.objects.filter(paused=True).exists()


def test_page_shows_each_school_with_its_backlog_unknowns_and_alerts(
    client, superuser, school, other_school
):
    for _ in range(3):
        factories.make_family(school=school)
    b = factories.make_broadcast(school=school)
    message_schedule(message=b, send_at=timezone.now())
    [mailing_id] = dispatch.dispatch_due()
    first = Delivery.objects.filter(mailing_id=mailing_id).first()
    Delivery.objects.filter(pk=first.pk).update(status=S.UNKNOWN)
    controls.sending_set_paused(paused=True, actor="test", school=other_school)
    heartbeats.heartbeat_record(name=heartbeats.BEAT)
    heartbeats.worker_record(hostname="w1@test")
    alerts.watch()

    response = get(client)
    assert response.status_code == 200
    rows = {row.school.pk: row for row in response.context["rows"]}
    assert rows[school.pk].stats.backlog == 2 and rows[school.pk].stats.unknown == 1
    assert rows[school.pk].open_alerts == 1
    assert rows[other_school.pk].school.sending_paused
    html = response.content.decode()
    assert "deliveries with an unknown outcome" in html
    assert f"school__id__exact={school.pk}" in html
    assert "w1@test" in html


def test_unknown_link_opens_the_filtered_delivery_list(client, superuser, school):
    """The page links to the admin's Delivery list filtered to one school's unknowns."""
    factories.make_family(school=school)
    b = factories.make_broadcast(school=school)
    message_schedule(message=b, send_at=timezone.now())
    dispatch.dispatch_due()
    Delivery.objects.update(status=S.UNKNOWN)
    url = f"/admin/notifications/delivery/?status__exact=unknown&school__id__exact={school.pk}"
    response = get(client, url)
    assert response.status_code == 200
    assert list(response.context["cl"].queryset) == list(Delivery.objects.all())


def test_pause_and_resume_globally(client, superuser):
    response = post(client, scope="global", action="pause", reason="incident 7")
    assert response.status_code == 302 and response["Location"] == "/ops/"
    switch = SendingSwitch.objects.get(pk=1)
    assert switch.paused and switch.reason == "incident 7"
    assert switch.changed_by == "root (ops page)"
    assert "PAUSED globally" in get(client).content.decode()
    post(client, scope="global", action="resume")
    assert not SendingSwitch.objects.get(pk=1).paused


def test_pause_and_resume_one_school(client, superuser, school, other_school):
    post(client, scope=str(school.pk), action="pause")
    assert School.objects.get(pk=school.pk).sending_paused
    assert not School.objects.get(pk=other_school.pk).sending_paused
    post(client, scope=str(school.pk), action="resume")
    assert not School.objects.get(pk=school.pk).sending_paused


def test_bad_requests_change_nothing(client, superuser, school):
    assert post(client, scope=str(school.pk), action="explode").status_code == 400
    assert post(client, scope="999999", action="pause").status_code == 404
    assert client.get("/ops/sending/", secure=True).status_code == 405
    assert not School.objects.filter(sending_paused=True).exists()


def test_switches_need_the_csrf_token(school):
    from django.test import Client

    strict = Client(enforce_csrf_checks=True)
    strict.force_login(
        get_user_model().objects.create_superuser("root2", "r2@example.org", "pw-tests-only")
    )
    response = strict.post(
        "/ops/sending/", data={"scope": "global", "action": "pause"}, secure=True
    )
    assert response.status_code == 403
    assert not SendingSwitch.objects.filter(paused=True).exists()


def test_recently_cleared_alerts_are_listed(client, superuser):
    Alert.objects.create(
        key="beat_silent",
        kind="beat_silent",
        severity=Alert.Severity.CRITICAL,
        message="celery beat is silent (test)",
        cleared_at=timezone.now() - dt.timedelta(hours=1),
    )
    html = get(client).content.decode()
    assert "celery beat is silent (test)" in html


def test_the_send_rate_in_force_is_shown(superuser, client, settings, redis_client):
    from notifications import ratelimit

    settings.EDSMART_SEND_RATE = 40
    settings.EDSMART_SEND_RATE_RECOVERY_SECONDS = 300
    assert "capped at 40.0 emails/s" in get(client).content.decode()
    ratelimit.backoff(detail="451 4.7.1 slow down")
    page = get(client).content.decode()
    assert "backed off to 20.0 emails/s" in page and "(cap 40.0)" in page
    assert "Throttling replies since Redis started: 1" in page
