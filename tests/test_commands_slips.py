"""seed_demo and compose: the command-line doors that scripts and the README rely on."""

from __future__ import annotations

import datetime as dt
import io
import re
import zoneinfo
from collections import Counter

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.test import override_settings
from django.utils import timezone

from slips.audiences import audience_recipients
from slips.models import (
    Audience,
    Broadcast,
    Group,
    Guardian,
    Membership,
    School,
    SendStatus,
    Slip,
    Student,
)
from tests import factories

SYDNEY = zoneinfo.ZoneInfo("Australia/Sydney")


def row_counts() -> dict[str, int]:
    models = [School, get_user_model(), Membership, Student, Guardian, Group, Audience]
    counts = {m.__name__: m.objects.count() for m in models}
    counts["guardian links"] = Guardian.students.through.objects.count()
    counts["group links"] = Group.students.through.objects.count()
    counts["audience groups"] = Audience.groups.through.objects.count()
    return counts


def seed(*args: str) -> str:
    """seed_demo as the dev stack runs it: with DEBUG on (it refuses otherwise, see below)."""
    out = io.StringIO()
    with override_settings(DEBUG=True):
        call_command("seed_demo", *args, stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_seed_demo_is_idempotent(monkeypatch):
    monkeypatch.delenv("DEMO_PASSWORD", raising=False)
    first_output = seed()
    first = row_counts()

    second_output = seed()

    assert row_counts() == first
    assert second_output == first_output
    assert first["Student"] > 20  # some families have two children
    assert "username demo-admin password edsmart-demo" in first_output


@pytest.mark.django_db
def test_seed_demo_builds_a_usable_school(monkeypatch):
    monkeypatch.setenv("DEMO_PASSWORD", "another-demo-pass")

    output = seed("--school", "eastwood", "--families", "8")

    school = School.objects.get(slug="eastwood")
    user = get_user_model().objects.get(username="eastwood-admin")
    assert user.is_staff and not user.is_superuser
    assert user.check_password("another-demo-pass")
    assert "password another-demo-pass" in output
    assert Membership.objects.get(user=user, school=school).role == Membership.Role.ADMIN
    kinds = Counter(Group.objects.filter(school=school).values_list("kind", flat=True))
    assert kinds[Group.Kind.YEAR] > 0 and kinds[Group.Kind.CLASS] > 0
    assert not Student.objects.filter(school=school, groups=None).exists()
    guardians = Guardian.objects.filter(school=school)
    assert all(g.email.endswith("@example.org") for g in guardians)
    per_student = Counter(
        Guardian.students.through.objects.filter(guardian__school=school).values_list(
            "student_id", flat=True
        )
    )
    per_guardian = Counter(
        Guardian.students.through.objects.filter(guardian__school=school).values_list(
            "guardian_id", flat=True
        )
    )
    assert max(per_student.values()) == 2  # two guardians
    assert max(per_guardian.values()) == 2  # siblings
    shared = Counter(guardians.values_list("email_normalized", flat=True))
    assert sorted(shared.values())[-1] == 2  # two parents, one family mailbox
    audience = Audience.objects.get(school=school, whole_school=True)
    assert audience.name == "Whole school"
    recipients = audience_recipients(audience)
    addresses = {g.email_normalized for g in guardians if g.receives_email}
    assert len(recipients) == len(addresses) < guardians.count()


@pytest.fixture
def family_school(school):
    """A school with two classes, families in each, and an empty group."""
    school.time_zone = "Australia/Sydney"
    school.save()
    three_a = factories.make_group(school=school, name="3A")
    factories.make_group(school=school, name="Chess club", kind=Group.Kind.CUSTOM)
    factories.make_family(school=school, children=2, guardians=2, group=three_a)
    factories.make_family(school=school, children=1, guardians=1)
    return school


def compose(*args: str) -> str:
    out = io.StringIO()
    call_command("compose", *args, stdout=out)
    return out.getvalue()


def _id_from_handle(output: str, *, kind: str) -> int:
    """The id in compose's output, which must be exactly one handle of ``kind`` (``slip:3``)."""
    match = re.fullmatch(rf"{kind}:([0-9]+)\n", output)
    assert match, f"compose printed {output!r}, not one {kind}:N handle"
    return int(match.group(1))


def message_counts() -> tuple[int, int, int]:
    return Slip.objects.count(), Broadcast.objects.count(), Audience.objects.count()


@pytest.mark.django_db
def test_compose_slip_for_whole_school_schedules_it_and_prints_only_its_handle(family_school):
    before = timezone.now()

    output = compose(
        "slip",
        "--school", family_school.slug,
        "--audience", "all",
        "--title", "Zoo excursion",
        "--body", "We are going to the zoo.",
        "--due", "2099-03-14",
    )  # fmt: skip

    slip = Slip.objects.get()
    assert output == f"slip:{slip.pk}\n"
    assert slip.status == SendStatus.SCHEDULED
    assert slip.school == family_school and slip.created_by is None
    assert slip.audience.whole_school and slip.audience.school == family_school
    assert before <= slip.send_at <= timezone.now()
    assert slip.due_at == dt.datetime(2099, 3, 14, 23, 59, tzinfo=SYDNEY)
    assert (slip.title, slip.body) == ("Zoo excursion", "We are going to the zoo.")

    compose(
        "broadcast", "--school", family_school.slug, "--audience", "ALL",
        "--title", "Again", "--body", "Same audience.",
    )  # fmt: skip
    assert Audience.objects.filter(school=family_school).count() == 1


@pytest.mark.django_db
def test_compose_broadcast_for_a_group_reads_naive_times_in_the_school_zone(family_school):
    args = [
        "broadcast",
        "--school", family_school.slug,
        "--audience", "group:3a",
        "--title", "Class photo",
        "--body", "Wear your uniform.",
        "--send-at", "2099-06-01T08:30",
    ]  # fmt: skip

    first_id = _id_from_handle(compose(*args), kind="broadcast")
    second_id = _id_from_handle(compose(*args), kind="broadcast")

    first, second = Broadcast.objects.get(pk=first_id), Broadcast.objects.get(pk=second_id)
    assert first.status == second.status == SendStatus.SCHEDULED
    assert first.send_at == dt.datetime(2099, 6, 1, 8, 30, tzinfo=SYDNEY)
    assert first.audience == second.audience  # reused, not piled up
    assert first.audience.name == "3A" and not first.audience.whole_school
    assert list(first.audience.groups.values_list("name", flat=True)) == ["3A"]
    assert len(audience_recipients(first.audience)) == 2


@pytest.mark.django_db
def test_compose_honours_an_explicit_offset(family_school):
    pk = compose(
        "slip", "--school", family_school.slug, "--audience", "all", "--title", "T",
        "--body", "B", "--send-at", "2099-06-01T08:30Z", "--due", "2099-06-02T10:00+10:00",
    )  # fmt: skip

    slip = Slip.objects.get(pk=_id_from_handle(pk, kind="slip"))
    assert slip.send_at == dt.datetime(2099, 6, 1, 8, 30, tzinfo=dt.UTC)
    assert slip.due_at == dt.datetime(2099, 6, 2, 0, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"--school": "nowhere"}, "No school with slug 'nowhere'"),
        ({"--audience": "group:Robotics"}, "No group named 'Robotics'"),
        ({"--audience": "class:3A"}, "--audience must be 'all' or 'group:NAME'"),
        ({"--audience": "group:chess CLUB"}, "--audience: This audience has no guardian"),
        ({"--send-at": "2001-01-01T09:00"}, "--send-at: The send time is in the past."),
        ({"--due": "2099-06-01T08:00"}, "--due: The due date must be after the send time."),
        ({"--send-at": "next tuesday"}, "--send-at: 'next tuesday' is not an ISO date"),
        ({"--due": "2099-13-01"}, "--due: '2099-13-01' is not an ISO date"),
        ({"--send-at": "2099-10-04T02:30"}, "does not exist in Australia/Sydney"),
        ({"--title": "Two\nlines"}, "--title: Must be a single line"),
        ({"--title": "x" * 201}, "--title: Ensure this value has at most 200 characters"),
        ({"--body": "   "}, "--body: The message has no body."),
    ],
)
@pytest.mark.django_db
def test_compose_errors_create_nothing(family_school, overrides, message):
    options = {
        "--school": family_school.slug,
        "--audience": "group:3A",
        "--title": "Sports day",
        "--body": "Bring a hat.",
        "--send-at": "2099-06-01T09:00",
        "--due": "2099-06-08",
    }
    options.update(overrides)
    args = ["slip"] + [part for pair in options.items() for part in pair]
    before = message_counts()

    with pytest.raises(CommandError) as info:
        compose(*args)

    assert message in str(info.value)
    assert message_counts() == before


@pytest.mark.django_db
def test_compose_refuses_a_due_date_on_a_broadcast(family_school):
    with pytest.raises(CommandError, match="--due applies to slips only"):
        compose(
            "broadcast", "--school", family_school.slug, "--audience", "all",
            "--title", "T", "--body", "B", "--due", "2099-01-01",
        )  # fmt: skip
    assert message_counts() == (0, 0, 0)


@pytest.mark.django_db(transaction=True)
def test_seed_demo_schedules_one_demo_slip_that_reaches_every_address(smtp, redis_client):
    from notifications import batch, dispatch

    seed("--families", "6")
    seed("--families", "6")
    [slip] = Slip.objects.filter(school__slug="demo")
    assert slip.status == SendStatus.SCHEDULED
    dispatch.dispatch_due()
    batch.batch_send()
    addresses = {r.email_normalized for r in audience_recipients(slip.audience)}
    assert {a.rcpt for a in smtp.accepted} == addresses
    assert len(smtp.accepted) == len(addresses)


# --- seed_demo touches only what it made (issue 13) ----------------------------------------------


def seed_without_debug(*args: str) -> str:
    out = io.StringIO()
    with override_settings(DEBUG=False):
        call_command("seed_demo", *args, stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_seed_demo_refuses_with_debug_off_unless_forced(monkeypatch):
    monkeypatch.delenv("DEMO_PASSWORD", raising=False)
    before = row_counts()
    with pytest.raises(CommandError, match="DEBUG is off"):
        seed_without_debug()
    assert row_counts() == before
    assert not Slip.objects.exists()

    output = seed_without_debug("--force")

    assert "username demo-admin password edsmart-demo" in output
    assert School.objects.filter(slug="demo").exists()


@pytest.mark.django_db
@pytest.mark.parametrize("force", [False, True])
def test_seed_demo_leaves_a_school_it_did_not_make_alone(force):
    """The issue: `seed_demo --school <real school>` reset <slug>-admin's password to the
    published one and scheduled a slip to the whole school."""
    real = factories.make_school(slug="northside")
    head = get_user_model().objects.create_user(
        "northside-admin", email="head@northside.edu.au", password="the-heads-own-password"
    )
    Membership.objects.create(user=head, school=real, role=Membership.Role.ADMIN)
    factories.make_family(school=real, children=2, guardians=1)
    before = row_counts()

    with pytest.raises(CommandError, match="not made by seed_demo"):
        if force:
            seed_without_debug("--school", "northside", "--force")
        else:
            seed("--school", "northside")

    assert row_counts() == before
    head.refresh_from_db()
    assert head.check_password("the-heads-own-password")
    assert not Slip.objects.exists() and not Audience.objects.exists()


@pytest.mark.django_db
def test_seed_demo_refuses_a_real_school_even_without_its_admin_login():
    factories.make_school(slug="southside")
    before = row_counts()
    with pytest.raises(CommandError, match="not made by seed_demo"):
        seed("--school", "southside")
    assert row_counts() == before
    assert not get_user_model().objects.filter(username="southside-admin").exists()


@pytest.mark.django_db
def test_seed_demo_does_not_take_over_an_existing_user_of_that_name():
    user = get_user_model().objects.create_user(
        "westside-admin", email="someone@westside.edu.au", password="their-own-password"
    )
    with pytest.raises(CommandError, match="not a demo login"):
        seed("--school", "westside")
    assert not School.objects.filter(slug="westside").exists()
    user.refresh_from_db()
    assert user.check_password("their-own-password") and not user.is_staff


@pytest.mark.django_db
def test_seed_demo_never_resets_a_password(monkeypatch):
    monkeypatch.delenv("DEMO_PASSWORD", raising=False)
    seed("--families", "2")
    user = get_user_model().objects.get(username="demo-admin")
    user.set_password("changed-after-seeding")
    user.save()
    counts = row_counts()

    output = seed("--families", "2")
    monkeypatch.setenv("DEMO_PASSWORD", "yet-another-one")
    again = seed("--families", "2")

    user.refresh_from_db()
    assert user.check_password("changed-after-seeding")
    for out in (output, again):
        assert "password was changed since it was seeded" in out
        assert "edsmart-demo" not in out and "yet-another-one" not in out
    assert row_counts() == counts
    assert Slip.objects.filter(school__slug="demo").count() == 1


@pytest.mark.django_db
def test_compose_urgent_marks_a_broadcast_and_refuses_a_slip(family_school):
    handle = compose(
        "broadcast", "--school", family_school.slug, "--audience", "all",
        "--title", "Closed today", "--body", "Burst water main.", "--urgent",
    )  # fmt: skip
    assert Broadcast.objects.get(pk=_id_from_handle(handle, kind="broadcast")).urgent
    with pytest.raises(CommandError, match="--urgent applies to broadcasts only"):
        compose(
            "slip", "--school", family_school.slug, "--audience", "all",
            "--title", "T", "--body", "B", "--urgent",
        )  # fmt: skip
