"""Staff views of answers and reach: the slip's answers page, its CSV export, answers taken by
phone, and a broadcast's sent / failed / unknown / opened counts.

Real PostgreSQL, two schools, everything through the Django test client: what is checked is
what the office sees on the page or in the file, and what is in the database afterwards.

School A's slip goes to the groups 3B and Choir:
```
student  groups        guardians                          answer
Ava      3B, Choir     Mum (email), Dad (phone only)      yes (Mum)       siblings: Ava, Ben
Ben      3B            Mum, Dad                           no  (Mum)
Cat      3B            Cal (suppressed: hard bounce)      —
Dan      Choir         Dee (email + phone)                —
Eve      4C            (not in the audience)              —
```

Over 400 lines on purpose: one roster (drawn above) serves every view of the answers, and
splitting the file would split the fixture from what it is read against.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import zoneinfo

import pytest
from django.contrib.messages import get_messages
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from notifications.models import Delivery, DeliveryStatus
from slips import selectors
from slips.models import Response, SendStatus
from slips.responses import response_record
from tests import factories

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("web_settings")]

NOTE = "Mail scanners that follow links inflate this number."


class World:
    """School A as in the module docstring, and school B with its own slip and staff."""

    def __init__(self) -> None:
        a = self.school = factories.make_school(slug="school-a", name="School A")
        self.staff = factories.make_staff(school=a, username="office_a")
        self.class_3b = factories.make_group(school=a, name="3B")
        self.choir = factories.make_group(school=a, name="Choir", kind="custom")
        self.class_4c = factories.make_group(school=a, name="4C")

        def kid(first: str, year: str, *groups) -> object:
            student = factories.make_student(
                school=a, first_name=first, last_name="Lee", year_level=year
            )
            for group in groups:
                group.students.add(student)
            return student

        self.ava = kid("Ava", "3", self.class_3b, self.choir)
        self.ben = kid("Ben", "3", self.class_3b)
        self.cat = kid("Cat", "3", self.class_3b)
        self.dan = kid("Dan", "5", self.choir)
        self.eve = kid("Eve", "4", self.class_4c)
        self.mum = factories.make_guardian(
            school=a, students=[self.ava, self.ben], name="Mum Lee", email="mum@example.net"
        )
        self.dad = factories.make_guardian(
            school=a,
            students=[self.ava, self.ben],
            name="Dad Lee",
            email="",
            receives_email=False,
            phone="0400 111 222",
        )
        self.cal = factories.make_guardian(
            school=a,
            students=[self.cat],
            name="Cal Lee",
            email="cal@example.net",
            suppressed_at=timezone.now(),
            suppressed_reason="hard bounce",
        )
        self.dee = factories.make_guardian(
            school=a,
            students=[self.dan],
            name="Dee Lee",
            email="dee@example.net",
            phone="0400 333 444",
        )
        factories.make_guardian(school=a, students=[self.eve], name="Eve's Parent")
        audience = factories.make_audience(
            school=a, whole_school=False, groups=[self.class_3b, self.choir]
        )
        self.slip = factories.make_slip(
            school=a,
            audience=audience,
            title="Zoo excursion",
            status=SendStatus.SENT,
            dispatched_at=timezone.now(),
        )
        response_record(slip=self.slip, student=self.ava, consent=True, guardian=self.mum)
        response_record(
            slip=self.slip,
            student=self.ben,
            consent=False,
            answer='=HYPERLINK("http://evil")',
            guardian=self.mum,
        )
        # Another slip where Ava said no and Cat said yes: must not leak into these counts.
        other_slip = factories.make_slip(
            school=a, audience=audience, status=SendStatus.SENT, dispatched_at=timezone.now()
        )
        response_record(slip=other_slip, student=self.ava, consent=False, guardian=self.mum)
        response_record(slip=other_slip, student=self.cat, consent=True, guardian=self.cal)

        b = self.school_b = factories.make_school(slug="school-b", name="School B")
        self.staff_b = factories.make_staff(school=b, username="office_b")
        self.kid_b = factories.make_student(school=b, first_name="Bo")
        factories.make_guardian(school=b, students=[self.kid_b])
        self.slip_b = factories.make_slip(
            school=b,
            audience=factories.make_audience(school=b, students=[self.kid_b], whole_school=False),
            status=SendStatus.SENT,
            dispatched_at=timezone.now(),
        )


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
def client(world) -> Client:
    client = Client()
    client.force_login(world.staff)
    return client


@pytest.fixture
def client_b(world) -> Client:
    client = Client()
    client.force_login(world.staff_b)
    return client


def _url(view: str, slip) -> str:
    return reverse(f"admin:slips_slip_{view}", args=[slip.pk])


def _counts(html: str, group: str) -> tuple[int, int, int, int]:
    """(yes, no, none, total) from the counts table row of ``group`` ("all" for the total)."""
    row = re.search(rf'<tr data-group="{re.escape(group)}">(.*?)</tr>', html, re.S)
    assert row, f"no counts row for {group!r}"
    cells = dict(re.findall(r'data-count="(\w+)">(\d+)<', row.group(1)))
    return tuple(int(cells[k]) for k in ("yes", "no", "none", "total"))


def _messages(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


def _record(client: Client, slip, **data: object):
    return client.post(_url("answer_record", slip), data)


# --- counts ----------------------------------------------------------------------------------


def test_counts_per_group_with_siblings_and_a_student_in_two_groups(world, client) -> None:
    page = client.get(_url("answers", world.slip))
    assert page.status_code == 200
    html = page.content.decode()
    assert _counts(html, "all") == (1, 1, 2, 4)  # Ava counted once in the total
    assert _counts(html, "3B") == (1, 1, 1, 3)
    assert _counts(html, "Choir") == (1, 0, 1, 2)  # Ava counted in Choir too
    assert 'data-group="4C"' not in html  # Eve is not in the audience


def test_counts_are_also_on_the_slip_change_page_with_a_link(world, client) -> None:
    html = client.get(reverse("admin:slips_slip_change", args=[world.slip.pk])).content.decode()
    assert _counts(html, "all") == (1, 1, 2, 4)
    assert _counts(html, "Choir") == (1, 0, 1, 2)
    assert f'href="{_url("answers", world.slip)}"' in html


def test_a_student_who_answered_and_then_left_the_audience_still_counts(world) -> None:
    world.choir.students.remove(world.ava)
    world.class_3b.students.remove(world.ava)
    summary = selectors.slip_answer_summary(slip=world.slip)
    assert (summary.total.yes, summary.total.no, summary.total.none) == (1, 1, 2)
    assert {g.label: (g.yes, g.no, g.none) for g in summary.groups} == {
        "3B": (0, 1, 1),
        "Choir": (0, 0, 1),
    }


def _queries(client: Client, url: str) -> int:
    with CaptureQueriesContext(connection) as captured:
        assert client.get(url).status_code == 200
    return len(captured)


def test_answers_page_and_export_take_as_many_queries_for_thirty_four_students_as_for_four(
    world, client
) -> None:
    urls = [_url("answers", world.slip), _url("answers_export", world.slip)]
    before = [_queries(client, url) for url in urls]
    for _ in range(10):  # more families, answered and not, in both groups
        kids, adults = factories.make_family(school=world.school, children=3, group=world.choir)
        world.class_3b.students.add(kids[0])
        response_record(slip=world.slip, student=kids[0], consent=True, guardian=adults[0])
        response_record(slip=world.slip, student=kids[1], consent=False, recorded_by=world.staff)
    assert [_queries(client, url) for url in urls] == before


# --- the no-answer list ----------------------------------------------------------------------


def test_no_answer_list_names_students_and_how_to_reach_their_guardians(world, client) -> None:
    page = client.get(_url("answers", world.slip))
    rows = {row.name: row for row in page.context["unanswered"]}
    assert set(rows) == {"Cat Lee", "Dan Lee"}
    assert page.context["unanswered_total"] == 2
    [cal] = rows["Cat Lee"].guardians
    assert (cal.name, cal.email, cal.suppressed, cal.suppressed_reason) == (
        "Cal Lee",
        "cal@example.net",
        True,
        "hard bounce",
    )
    [dee] = rows["Dan Lee"].guardians
    assert (dee.phone, dee.receives_email, dee.suppressed) == ("0400 333 444", True, False)
    html = page.content.decode()
    section = html.split('id="unanswered-list"', 1)[1].split("</table>", 1)[0]
    assert "suppressed: hard bounce" in section
    assert "0400 333 444" in section
    assert "Ava Lee" not in section and "Ben Lee" not in section


def test_no_answer_list_shows_guardians_without_email(world, client) -> None:
    Response.objects.filter(slip=world.slip, student=world.ben).delete()
    page = client.get(_url("answers", world.slip))
    [ben] = [row for row in page.context["unanswered"] if row.name == "Ben Lee"]
    contacts = {g.name: (g.phone, g.receives_email) for g in ben.guardians}
    assert contacts == {"Mum Lee": ("", True), "Dad Lee": ("0400 111 222", False)}
    assert "does not receive email" in page.content.decode()


# --- CSV export ------------------------------------------------------------------------------


def test_csv_export_has_every_student_in_school_time_with_formulas_escaped(world, client):
    ben = Response.objects.get(slip=world.slip, student=world.ben)
    Response.objects.filter(pk=ben.pk).update(
        answered_at=dt.datetime(2025, 3, 3, 23, 30, tzinfo=dt.UTC)
    )
    response_record(
        slip=world.slip, student=world.dan, consent=True, answer="Hat", recorded_by=world.staff
    )
    export = client.get(_url("answers_export", world.slip))
    assert export.status_code == 200
    assert export["Content-Type"].startswith("text/csv")
    assert 'filename="answers-slip-' in export["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(export.content.decode())))
    assert rows[0] == [
        "student",
        "year level",
        "groups",
        "consent",
        "answer",
        "answered at (Australia/Sydney)",
        "answered by",
    ]
    body = {row[0]: row for row in rows[1:]}
    assert set(body) == {"Ava Lee", "Ben Lee", "Cat Lee", "Dan Lee"}
    ava = Response.objects.get(slip=world.slip, student=world.ava)
    sydney = zoneinfo.ZoneInfo("Australia/Sydney")
    assert body["Ava Lee"] == [
        "Ava Lee",
        "3",
        "3B; Choir",
        "yes",
        "",
        ava.answered_at.astimezone(sydney).strftime("%Y-%m-%d %H:%M"),
        "Mum Lee",
    ]
    # 23:30 UTC on 3 March is 10:30 the next morning in Sydney (daylight saving time).
    assert body["Ben Lee"][3:] == [
        "no",
        '\'=HYPERLINK("http://evil")',
        "2025-03-04 10:30",
        "Mum Lee",
    ]
    assert body["Cat Lee"] == ["Cat Lee", "3", "3B", "", "", "", ""]
    assert body["Dan Lee"][3:5] == ["yes", "Hat"]
    assert body["Dan Lee"][6] == "staff: office_a (phone)"


# --- answers taken by phone ------------------------------------------------------------------


def test_phone_answer_is_recorded_with_the_staff_member_and_shown_as_such(world, client):
    response = _record(
        client,
        world.slip,
        student=world.dan.pk,
        consent="yes",
        answer="Will bring a hat",
        guardian=world.dee.pk,
    )
    assert response.status_code == 302
    assert response["Location"] == _url("answers", world.slip)
    saved = Response.objects.get(slip=world.slip, student=world.dan)
    assert (saved.consent, saved.answer, saved.guardian, saved.recorded_by) == (
        True,
        "Will bring a hat",
        world.dee,
        world.staff,
    )
    assert list(saved.changes.values_list("consent", "recorded_by", "guardian")) == [
        (True, world.staff.pk, world.dee.pk)
    ]
    page = client.get(response["Location"])
    assert "Recorded “yes” for Dan Lee (phone, by you)." in _messages(page)
    row = page.content.decode().split(f'<tr data-student="{world.dan.pk}">', 2)[-1]
    row = row.split("</tr>", 1)[0]
    assert "recorded by office_a (phone), Dee Lee called" in row
    assert "Dan Lee" not in {r.name for r in page.context["unanswered"]}


def test_phone_answer_changes_a_parents_answer_and_keeps_the_history(world, client):
    _record(client, world.slip, student=world.ben.pk, consent="yes", guardian=world.dad.pk)
    ben = Response.objects.get(slip=world.slip, student=world.ben)
    assert (ben.consent, ben.recorded_by, ben.guardian) == (True, world.staff, world.dad)
    history = list(ben.changes.order_by("answered_at", "pk"))
    assert [(c.consent, c.guardian_id, c.recorded_by_id) for c in history] == [
        (False, world.mum.pk, None),
        (True, world.dad.pk, world.staff.pk),
    ]
    page = client.get(_url("answers", world.slip))
    assert "2 answers" in page.content.decode()


def test_the_same_answer_again_changes_nothing_and_says_so(world, client):
    response = _record(client, world.slip, student=world.ava.pk, consent="yes")
    assert response.status_code == 302
    assert "Ava Lee already had the answer “yes”; nothing changed." in _messages(
        client.get(response["Location"])
    )
    ava = Response.objects.get(slip=world.slip, student=world.ava)
    assert (ava.recorded_by, ava.changes.count()) == (None, 1)


def test_staff_may_record_after_the_due_date(world, client):
    world.slip.due_at = timezone.now() - dt.timedelta(days=2)
    world.slip.save(update_fields=["due_at"])
    response = _record(client, world.slip, student=world.cat.pk, consent="no")
    assert response.status_code == 302
    assert Response.objects.get(slip=world.slip, student=world.cat).recorded_by == world.staff


def test_guardian_must_be_the_students_own(world, client):
    response = _record(
        client, world.slip, student=world.cat.pk, consent="yes", guardian=world.dee.pk
    )
    assert response.status_code == 200
    assert "Dee Lee is not a guardian of Cat Lee." in str(response.context["form"].errors)
    assert not Response.objects.filter(slip=world.slip, student=world.cat).exists()


def test_guardian_choices_narrow_to_the_chosen_student(world, client):
    form = client.get(_url("answers", world.slip), {"student": world.ava.pk}).context["form"]
    assert set(form.fields["guardian"].queryset) == {world.mum, world.dad}
    assert form.initial["student"] == world.ava.pk
    everyone = client.get(_url("answers", world.slip)).context["form"]
    assert set(everyone.fields["guardian"].queryset) == {world.mum, world.dad, world.cal, world.dee}
    assert world.eve not in set(everyone.fields["student"].queryset)


@pytest.mark.parametrize("who", ["eve", "kid_b"])
def test_only_students_of_the_slips_audience_can_be_answered_for(world, client, who):
    student = getattr(world, who)
    response = _record(client, world.slip, student=student.pk, consent="yes")
    assert response.status_code == 200
    assert "student" in response.context["form"].errors
    assert not Response.objects.filter(student=student).exists()


def test_a_draft_slip_takes_no_phone_answers(world, client):
    draft = factories.make_slip(school=world.school, audience=world.slip.audience)
    page = client.get(_url("answers", draft))
    assert page.context["can_record"] is False
    assert 'id="record-form"' not in page.content.decode()
    response = _record(client, draft, student=world.cat.pk, consent="yes")
    assert response.status_code == 200
    assert "This slip is not open for answers." in str(response.context["form"].errors)
    assert not Response.objects.filter(slip=draft).exists()


def test_recording_needs_post_and_a_csrf_token(world):
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(world.staff)
    url = _url("answer_record", world.slip)
    assert strict.get(url).status_code == 405
    assert strict.post(url, {"student": world.cat.pk, "consent": "yes"}).status_code == 403
    assert not Response.objects.filter(slip=world.slip, student=world.cat).exists()


# --- tenancy ---------------------------------------------------------------------------------


def test_another_schools_staff_get_404_for_every_answers_door(world, client_b):
    assert client_b.get(_url("answers", world.slip)).status_code == 404
    assert client_b.get(_url("answers_export", world.slip)).status_code == 404
    response = _record(client_b, world.slip, student=world.cat.pk, consent="yes")
    assert response.status_code == 404
    assert not Response.objects.filter(slip=world.slip, student=world.cat).exists()
    # Their own slip opens, and shows nothing of school A.
    own = client_b.get(_url("answers", world.slip_b))
    assert own.status_code == 200
    assert "Cat Lee" not in own.content.decode()
    assert "Zoo excursion" not in own.content.decode()


def test_own_slip_form_refuses_another_schools_student_and_guardian(world, client_b):
    response = _record(
        client_b, world.slip_b, student=world.kid_b.pk, consent="yes", guardian=world.dee.pk
    )
    assert response.status_code == 200
    assert "guardian" in response.context["form"].errors
    assert not Response.objects.filter(slip=world.slip_b).exists()


# --- broadcasts ------------------------------------------------------------------------------


def _broadcast_with_deliveries(school, rows: list[tuple[str, bool]]):
    broadcast = factories.make_broadcast(
        school=school, status=SendStatus.SENT, dispatched_at=timezone.now()
    )
    mailing = factories.make_mailing(broadcast)
    Delivery.objects.bulk_create(
        Delivery(
            mailing=mailing,
            school=school,
            email=f"b{broadcast.pk}-{i}@example.net",
            email_normalized=f"b{broadcast.pk}-{i}@example.net",
            status=status,
            opened_at=timezone.now() if opened else None,
        )
        for i, (status, opened) in enumerate(rows)
    )
    return broadcast


def _reach(html: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r'data-reach="(\w+)">(\d+)<', html)}


def test_broadcast_shows_sent_failed_unknown_and_opened_with_the_scanner_note(world, client):
    broadcast = _broadcast_with_deliveries(
        world.school,
        [
            (DeliveryStatus.SENT, True),
            (DeliveryStatus.SENT, True),
            (DeliveryStatus.SENT, False),
            (DeliveryStatus.FAILED, False),
            (DeliveryStatus.UNKNOWN, True),
            (DeliveryStatus.PENDING, False),
        ],
    )
    # Another broadcast's opened deliveries are not this one's.
    _broadcast_with_deliveries(world.school, [(DeliveryStatus.SENT, True)] * 4)
    page = client.get(reverse("admin:slips_broadcast_change", args=[broadcast.pk]))
    assert page.status_code == 200
    html = page.content.decode()
    assert _reach(html) == {"sent": 3, "failed": 1, "unknown": 1, "opened": 3}
    assert NOTE in html


def test_another_schools_broadcast_reach_is_not_reachable(world, client_b):
    broadcast = _broadcast_with_deliveries(world.school, [(DeliveryStatus.SENT, True)])
    page = client_b.get(reverse("admin:slips_broadcast_change", args=[broadcast.pk]))
    assert page.status_code == 404
