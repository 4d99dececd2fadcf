"""The staff home page and its live JSON, the preview of a message, and "send a test to me".

Everything through the Django test client against real PostgreSQL, Redis and SMTP: what is
checked is what staff see on the page or in the JSON, what the test SMTP server caught, and
what is (not) in the database afterwards.
"""

from __future__ import annotations

import datetime as dt
import email
import re

import pytest
from django.contrib.auth import get_user_model
from django.contrib.messages import get_messages
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from notifications import batch, preview
from notifications.models import Alert, Delivery, Mailing, SendingSwitch
from slips.models import Membership, Response, SendStatus
from slips.responses import response_record
from slips.services import message_schedule
from tests import factories

pytestmark = [pytest.mark.usefixtures("web_settings")]

R = Membership.Role
STATUS_URL = "admin:home_status"


def _client(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _staff(school, username: str, role: str = R.TEACHER, email_address: str = "") -> object:
    user = factories.make_staff(school=school, username=username, role=role)
    user.email = email_address
    user.save(update_fields=["email"])
    return user


def _status(client: Client, **params: str) -> dict:
    response = client.get(reverse(STATUS_URL), params)
    assert response.status_code == 200, response.status_code
    assert "no-store" in response["Cache-Control"]
    return response.json()


def _titles(data: dict, section: str = "sending") -> set[str]:
    return {row["title"] for row in data[section]}


def _messages(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


# --- the home page and its JSON -------------------------------------------------------------


@pytest.mark.django_db
def test_home_shows_only_the_users_schools(school, other_school) -> None:
    ours, _ = factories.broadcast_dispatched(school=school, families=3)
    theirs, _ = factories.broadcast_dispatched(school=other_school, families=2)
    Mailing.objects.filter(broadcast=theirs).update(subject="ZZOTHER news")
    Alert.objects.create(
        key="a1", kind="backlog", severity="warning", school=school, message="Ours"
    )
    Alert.objects.create(
        key="a2", kind="backlog", severity="critical", school=other_school, message="ZZOTHER"
    )
    Alert.objects.create(key="a3", kind="beat", severity="critical", message="ZZOTHER global")
    teacher = _staff(school, "t1")

    data = _status(_client(teacher))
    assert _titles(data) == {ours.title}
    [row] = data["sending"]
    assert (row["total"], row["done"], row["sent"], row["waiting"]) == (3, 0, 0, 3)
    assert [a["message"] for a in data["alerts"]] == ["Ours"]
    page = _client(teacher).get(reverse("admin:index"))
    assert page.status_code == 200
    html = page.content.decode()
    assert "ZZOTHER" not in html
    assert ours.title in html and "Sending now" in html
    assert "EdSmart · School northside" in html and "Django administration" not in html
    assert "notifications/staff_home.js" in html
    # The list of everything is still there, below.
    assert page.context["app_list"]

    # Another school's id is a 404, whatever the user asks for.
    other = _client(teacher).get(reverse(STATUS_URL), {"school": other_school.pk})
    assert other.status_code == 404
    assert _client(teacher).get(reverse(STATUS_URL), {"school": "1x"}).status_code == 404


@pytest.mark.django_db
def test_a_user_of_two_schools_sees_both_and_can_pick_one(school, other_school) -> None:
    a, _ = factories.broadcast_dispatched(school=school, families=1)
    b, _ = factories.broadcast_dispatched(school=other_school, families=1)
    user = _staff(school, "both")
    Membership.objects.create(user=user, school=other_school, role=R.OFFICE)
    client = _client(user)
    assert _titles(_status(client)) == {a.title, b.title}
    assert _titles(_status(client, school=str(other_school.pk))) == {b.title}
    page = client.get(reverse("admin:index"))
    assert 'id="edsmart-school"' in page.content.decode()  # the picker
    assert "EdSmart ·" not in page.content.decode()  # no single school to name


@pytest.mark.django_db
def test_ops_see_every_school_and_staff_without_a_school_see_nothing(school, other_school):
    a, _ = factories.broadcast_dispatched(school=school, families=1)
    b, _ = factories.broadcast_dispatched(school=other_school, families=1)
    ops = get_user_model().objects.create_superuser("ops", "ops@example.org", "pw-for-tests-only")
    assert _titles(_status(_client(ops))) == {a.title, b.title}
    assert _titles(_status(_client(ops), school=str(school.pk))) == {a.title}
    stray = get_user_model().objects.create_user("stray", password="x-pw-1", is_staff=True)
    assert _status(_client(stray))["sending"] == []


def test_status_needs_a_staff_login(client, db) -> None:
    response = client.get(reverse(STATUS_URL))
    assert response.status_code == 302
    assert "/login/" in response["Location"]


@pytest.mark.django_db(transaction=True)
def test_progress_moves_as_the_pipeline_sends(school, smtp, redis_client) -> None:
    _, mailing_id = factories.broadcast_dispatched(school=school, families=4)
    client = _client(_staff(school, "watcher"))
    [before] = _status(client)["sending"]
    assert (before["done"], before["total"], before["finished"]) == (0, 4, False)
    assert before["rate_since_start"] == 0

    batch.batch_send(mailing_id=mailing_id)
    data = _status(client)
    [after] = data["sending"]
    assert (after["sent"], after["done"], after["waiting"]) == (4, 4, 0)
    assert after["rate_since_start"] > 0
    assert len(smtp.accepted) == 4

    # Completed by the sweep: still shown (as finished) for a while, and the page slows down.
    from notifications.sweep import mailings_complete

    mailings_complete()
    [done] = _status(client)["sending"]
    assert done["finished"] and done["status"] == "finished"
    assert _status(client)["poll_ms"] > data["poll_ms"]


@pytest.mark.django_db
def test_paused_messages_say_why(school) -> None:
    from notifications import controls

    broadcast, _ = factories.broadcast_dispatched(school=school, families=1)
    client = _client(_staff(school, "p"))
    controls.message_pause(message=broadcast)
    [row] = _status(client)["sending"]
    assert row["paused"] and row["paused_why"] == "this message is paused"
    controls.message_resume(message=broadcast)
    controls.sending_set_paused(paused=True, actor="ops")
    data = _status(client)
    assert data["global_paused"]
    assert data["sending"][0]["paused_why"] == "ops have paused all sending"


@pytest.mark.django_db
def test_scheduled_next_and_recent_slips_with_their_answer_rate(school, other_school) -> None:
    _, kids, guardians, sent = factories.family_slip_dispatched(
        school=school, children=2, title="Zoo excursion"
    )
    factories.make_family(school=other_school)
    sent.refresh_from_db()
    later = factories.make_slip(school=school, title="Athletics carnival")
    message_schedule(message=later, send_at=timezone.now() + dt.timedelta(days=2))
    theirs = factories.make_slip(school=other_school, title="ZZOTHER slip")
    message_schedule(message=theirs, send_at=timezone.now() + dt.timedelta(days=1))
    response_record(slip=sent, student=kids[0], consent=True, answer="", guardian=guardians[0])
    data = _status(_client(_staff(school, "s")))
    assert [(u["title"], u["kind"]) for u in data["scheduled"]] == [("Athletics carnival", "Slip")]
    [recent] = data["recent_slips"]
    assert (recent["title"], recent["yes"], recent["none"], recent["answered_percent"]) == (
        "Zoo excursion",
        1,
        1,
        50,
    )
    assert recent["url"] == reverse("admin:slips_slip_answers", args=[sent.pk])
    assert Response.objects.count() == 1


# --- preview -----------------------------------------------------------------------------------


@pytest.fixture
def family_slip(school):
    kids = [
        factories.make_student(school=school, first_name="Ava", last_name="Nguyen"),
        factories.make_student(school=school, first_name="Ben", last_name="Nguyen"),
    ]
    factories.make_guardian(
        school=school, students=kids, name="Mai Nguyen", email="mai@example.net"
    )
    audience = factories.make_audience(school=school, whole_school=False, students=kids)
    return factories.make_slip(
        school=school,
        audience=audience,
        title="Aquarium <excursion>",
        body="We visit the aquarium.\n\n<script>alert(1)</script>",
        consent_question="May your child come?",
    )


@pytest.mark.django_db
def test_preview_shows_the_email_a_family_will_get(school, family_slip) -> None:
    client = _client(_staff(school, "pv"))
    response = client.get(reverse("admin:slips_slip_preview", args=[family_slip.pk]))
    assert response.status_code == 200
    html = response.content.decode()
    parts = response.context["parts"]
    assert parts.subject == "Aquarium <excursion>"
    assert "Mai Nguyen" in html
    assert "This slip is for: Ava Nguyen, Ben Nguyen." in parts.text
    answer_url = reverse("admin:slips_slip_preview_answer", args=[family_slip.pk])
    assert answer_url in parts.text and "/p/" not in parts.text  # never a parent's link
    # Staff content is escaped in the HTML part, and the part is shown in a sandboxed frame.
    assert "<script>alert(1)</script>" not in parts.html
    assert "&lt;script&gt;" in parts.html
    frame = re.search(r'<iframe id="edsmart-email-html"[^>]*>', html).group(0)
    assert " sandbox " in frame and 'srcdoc="&lt;!doctype html&gt;' in frame
    assert "&amp;lt;script&amp;gt;" in frame  # the email's escaping, escaped again for srcdoc
    assert "<script>alert" not in html
    assert Mailing.objects.count() == 0 and Delivery.objects.count() == 0


@pytest.mark.django_db
def test_the_answer_page_behind_a_preview_link_records_nothing(school, family_slip) -> None:
    client = _client(_staff(school, "pa"))
    url = reverse("admin:slips_slip_preview_answer", args=[family_slip.pk])
    page = client.get(url)
    assert page.status_code == 200
    html = page.content.decode()
    assert "Preview." in html and "May your child come?" in html and "Ava Nguyen" in html
    assert page["Content-Security-Policy"].startswith("sandbox;")
    assert "form-action 'none'" in page["Content-Security-Policy"]
    assert "csrfmiddlewaretoken" not in html
    student = family_slip.audience.students.first()
    posted = client.post(url, {f"consent_{student.pk}": "yes"})
    assert posted.status_code == 405
    assert Response.objects.count() == 0
    assert Client().get(url).status_code == 302  # a staff login is needed


@pytest.mark.django_db
def test_a_broadcast_and_an_empty_audience_preview_too(school) -> None:
    broadcast = factories.make_broadcast(school=school, title="Closure notice")
    client = _client(_staff(school, "pb"))
    response = client.get(reverse("admin:slips_broadcast_preview", args=[broadcast.pk]))
    assert response.status_code == 200
    assert response.context["family"].made_up
    assert "Closure notice" in response.context["parts"].html
    answer = client.get(reverse("admin:slips_broadcast_preview_answer", args=[broadcast.pk]))
    assert answer.status_code == 200 and "Closure notice" in answer.content.decode()


@pytest.mark.django_db
def test_preview_and_test_send_of_another_schools_message_are_404(school, other_school) -> None:
    theirs = factories.make_slip(school=other_school)
    their_broadcast = factories.make_broadcast(school=other_school)
    client = _client(_staff(school, "nosy", email_address="nosy@example.org"))
    for name, obj in (("slip", theirs), ("broadcast", their_broadcast)):
        for view in ("preview", "preview_answer"):
            url = reverse(f"admin:slips_{name}_{view}", args=[obj.pk])
            assert client.get(url).status_code == 404
        url = reverse(f"admin:slips_{name}_preview_test", args=[obj.pk])
        assert client.post(url).status_code == 404


@pytest.mark.django_db
def test_the_change_page_links_to_the_preview(school, family_slip) -> None:
    client = _client(_staff(school, "cl"))
    page = client.get(reverse("admin:slips_slip_change", args=[family_slip.pk]))
    assert reverse("admin:slips_slip_preview", args=[family_slip.pk]) in page.content.decode()


# --- send a test to me -------------------------------------------------------------------------


def _test_send(client: Client, slip) -> object:
    return client.post(reverse("admin:slips_slip_preview_test", args=[slip.pk]))


@pytest.mark.parametrize("role", [R.TEACHER, R.OFFICE, R.ADMIN])
@pytest.mark.django_db(transaction=True)
def test_a_test_goes_to_the_user_only_and_is_not_one_of_the_sends(
    school, family_slip, smtp, redis_client, role
) -> None:
    user = _staff(school, f"me-{role}", role=role, email_address="teacher@school.example")
    response = _test_send(_client(user), family_slip)
    assert response.status_code == 302
    assert response["Location"] == reverse("admin:slips_slip_preview", args=[family_slip.pk])
    [text] = _messages(response)
    assert "accepted by the mail server" in text and "teacher@school.example" in text
    [caught] = smtp.accepted
    assert caught.rcpt == "teacher@school.example"
    msg = email.message_from_bytes(caught.raw)
    assert msg["Subject"] == "[TEST] Aquarium <excursion>"
    assert msg["To"] == "teacher@school.example"
    assert msg["Message-ID"].startswith("<edsmart.test.")
    body = next(p for p in msg.walk() if p.get_content_type() == "text/plain")
    assert "Ava Nguyen, Ben Nguyen" in body.get_payload(decode=True).decode()
    # Nothing of the message's own sending exists, and its draft is untouched.
    assert Mailing.objects.count() == 0 and Delivery.objects.count() == 0
    family_slip.refresh_from_db()
    assert family_slip.status == SendStatus.DRAFT

    # The real send later goes to the family, and only to them, exactly once.
    mailing_id = factories.dispatch_now(family_slip)
    batch.batch_send(mailing_id=mailing_id)
    assert [a.rcpt for a in smtp.accepted] == ["teacher@school.example", "mai@example.net"]
    assert list(Delivery.objects.values_list("email", "status")) == [("mai@example.net", "sent")]


@pytest.mark.django_db(transaction=True)
def test_a_test_after_sending_still_creates_no_delivery(school, smtp, redis_client) -> None:
    broadcast, mailing_id = factories.broadcast_dispatched(school=school, families=2)
    batch.batch_send(mailing_id=mailing_id)
    rows = list(Delivery.objects.order_by("pk").values_list("pk", "status", "accepted"))
    user = _staff(school, "late", email_address="late@school.example")
    url = reverse("admin:slips_broadcast_preview_test", args=[broadcast.pk])
    assert _client(user).post(url).status_code == 302
    assert smtp.accepted[-1].rcpt == "late@school.example"
    assert list(Delivery.objects.order_by("pk").values_list("pk", "status", "accepted")) == rows
    assert Mailing.objects.count() == 1


@pytest.mark.django_db
def test_no_address_no_test(school, family_slip, smtp, redis_client) -> None:
    response = _test_send(_client(_staff(school, "noaddr")), family_slip)
    [text] = _messages(response)
    assert "no email address" in text
    assert smtp.accepted == []


@pytest.mark.django_db
def test_tests_are_limited_per_user(school, family_slip, smtp, redis_client) -> None:
    me = _client(_staff(school, "busy", email_address="busy@school.example"))
    for _ in range(preview.TEST_SENDS_PER_WINDOW):
        assert "accepted" in _messages(_test_send(me, family_slip))[-1]
    assert "Please wait" in _messages(_test_send(me, family_slip))[-1]
    assert len(smtp.accepted) == preview.TEST_SENDS_PER_WINDOW
    # Another staff member has their own allowance.
    other = _client(_staff(school, "calm", email_address="calm@school.example"))
    [text] = _messages(_test_send(other, family_slip))
    assert "accepted" in text
    busy = get_user_model().objects.get(username="busy")
    assert 0 < redis_client.ttl(f"edsmart:test-send:{busy.pk}") <= preview.TEST_WINDOW_SECONDS


@pytest.mark.django_db
def test_no_test_while_ops_have_paused_all_sending(school, family_slip, smtp, redis_client) -> None:
    SendingSwitch.objects.create(pk=1, paused=True, reason="incident")
    response = _test_send(_client(_staff(school, "p2", email_address="p2@x.example")), family_slip)
    [text] = _messages(response)
    assert "paused by ops" in text
    assert smtp.accepted == []


@pytest.mark.django_db
def test_test_send_refuses_get(school, family_slip) -> None:
    client = _client(_staff(school, "g", email_address="g@x.example"))
    url = reverse("admin:slips_slip_preview_test", args=[family_slip.pk])
    assert client.get(url).status_code == 405


@pytest.mark.django_db
def test_the_lists_say_statuses_in_staff_words(school) -> None:
    from notifications.models import DeliveryStatus

    _, mailing_id = factories.broadcast_dispatched(school=school, families=2)
    first, second = Delivery.objects.filter(mailing_id=mailing_id).order_by("pk")
    Delivery.objects.filter(pk=first.pk).update(status=DeliveryStatus.UNKNOWN)
    Delivery.objects.filter(pk=second.pk).update(status=DeliveryStatus.RETRY_WAIT)
    client = _client(_staff(school, "words"))
    deliveries = client.get(reverse("admin:notifications_delivery_changelist")).content.decode()
    assert "outcome unknown: ops are looking at it" in deliveries
    assert "waiting to retry" in deliveries
    mailings = client.get(reverse("admin:notifications_mailing_changelist")).content.decode()
    assert '<td class="field-status_words">sending</td>' in mailings
