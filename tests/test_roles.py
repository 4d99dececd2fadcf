"""What each school role may do in the staff admin, walked for every registered admin and action.

The policy below is the one place that says it; docs/security.md says it in words. The cases
are generated from ``admin.site._registry``, as in tests/test_admin_isolation.py: a new admin
or a new action without a line in ``POLICY`` / ``ACTIONS`` fails
``test_every_admin_has_a_policy`` / ``test_every_action_has_a_policy``, so nothing new is
granted by default without someone deciding it here.

In short: only a school's admins change the school (name, sender address, time zone, quiet
hours, sending switch), undo bounce and complaint suppressions, and delete; admins and office
staff keep the people (students and guardians) up to date; every member, teachers included,
works on groups, audiences, slips and broadcasts, and reads answers and deliveries.
Memberships, users and everything else not owned by a school are for ops (superusers) only.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from django.contrib import admin
from django.contrib.admin.models import LogEntry
from django.contrib.auth import get_user_model
from django.db import models
from django.test import Client, RequestFactory
from django.urls import reverse
from django.utils import timezone

from edsmart.admin_tenancy import TenantAdmin
from notifications.models import Delivery, DeliveryEvent, Mailing, ProviderEvent
from slips.models import (
    Audience,
    Broadcast,
    Group,
    Guardian,
    Membership,
    Response,
    RosterImport,
    School,
    Slip,
    Student,
)
from tests import factories
from tests.test_admin_isolation import Side, _build_side

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("web_settings")]

R = Membership.Role
ROLES = (R.ADMIN, R.OFFICE, R.TEACHER)
EVERY = frozenset(ROLES)
NOBODY: frozenset[str] = frozenset()
ADMIN = frozenset({R.ADMIN})
PEOPLE = frozenset({R.ADMIN, R.OFFICE})


@dataclass(frozen=True)
class Grant:
    """The roles that may view, add, change and delete a school's rows of one model."""

    view: frozenset[str]
    add: frozenset[str]
    change: frozenset[str]
    delete: frozenset[str]


WORK = Grant(view=EVERY, add=EVERY, change=EVERY, delete=ADMIN)
READ = Grant(view=EVERY, add=NOBODY, change=NOBODY, delete=NOBODY)

POLICY: dict[type[models.Model], Grant] = {
    School: Grant(view=EVERY, add=NOBODY, change=ADMIN, delete=NOBODY),
    Student: Grant(view=EVERY, add=PEOPLE, change=PEOPLE, delete=ADMIN),
    Guardian: Grant(view=EVERY, add=PEOPLE, change=PEOPLE, delete=ADMIN),
    Group: WORK,
    Audience: WORK,
    Slip: WORK,
    Broadcast: WORK,
    Response: READ,  # parents answer through their links; staff record by phone on the slip
    Mailing: READ,
    Delivery: READ,
    DeliveryEvent: READ,
    ProviderEvent: READ,  # the bounce log: written by the provider's events
    # Uploading a roster adds and changes people: who keeps the people imports them.
    RosterImport: Grant(view=PEOPLE, add=PEOPLE, change=PEOPLE, delete=NOBODY),
}

ACTIONS: dict[tuple[type[models.Model], str], frozenset[str]] = {
    (School, "delete_selected"): NOBODY,  # ops only
    (School, "pause_sending"): ADMIN,
    (School, "resume_sending"): ADMIN,
    (Student, "delete_selected"): ADMIN,
    (Student, "export_csv"): EVERY,
    (Guardian, "delete_selected"): ADMIN,
    (Guardian, "export_csv"): EVERY,
    (Guardian, "reactivate"): ADMIN,
    (Group, "delete_selected"): ADMIN,
    (Audience, "delete_selected"): ADMIN,
    **{(Slip, name): EVERY for name in ("schedule", "unschedule", "pause", "resume", "cancel")},
    (Slip, "delete_selected"): ADMIN,
    (Slip, "export_responses_csv"): EVERY,
    (Slip, "remind_now"): EVERY,
    **{
        (Broadcast, name): EVERY for name in ("schedule", "unschedule", "pause", "resume", "cancel")
    },
    (Broadcast, "delete_selected"): ADMIN,
    (Response, "export_csv"): EVERY,
    # Pausing a mailing and settling unknown deliveries are part of sending a message.
    (Mailing, "pause_mailings"): EVERY,
    (Mailing, "resume_mailings"): EVERY,
    (Delivery, "mark_unknown_sent"): EVERY,
    (Delivery, "mark_unknown_failed"): EVERY,
    (Delivery, "resend_unknown"): EVERY,
    # Mail goes to a bounced or complaining address again: the school's admins decide.
    (ProviderEvent, "reactivate_address"): ADMIN,
}

REGISTRY = sorted(admin.site._registry.items(), key=lambda item: item[0]._meta.label)
TENANT = [(m, a) for m, a in REGISTRY if isinstance(a, TenantAdmin)]
OPS_ONLY = [(m, a) for m, a in REGISTRY if not isinstance(a, TenantAdmin)]


def _all_actions() -> list[tuple[type[models.Model], str]]:
    """Every action of every admin, as ops (who are offered all of them) see it."""
    ops = get_user_model()(is_staff=True, is_superuser=True, is_active=True)
    found = []
    for model, model_admin in REGISTRY:
        request = RequestFactory().get("/")
        request.user = ops
        found += [(model, name) for name in model_admin.get_actions(request)]
    return found


ALL_ACTIONS = _all_actions()


def _url(model: type[models.Model], view: str, *args: object) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


@dataclass
class World:
    side: Side
    users: dict[str, object]

    def client(self, role: str) -> Client:
        client = Client()
        client.force_login(self.users[role])
        return client


@pytest.fixture
def world() -> World:
    side = _build_side("Own", "own-school", "own_admin")
    users = {
        R.ADMIN: side.staff,
        R.OFFICE: factories.make_staff(school=side.school, username="own_office", role=R.OFFICE),
        R.TEACHER: factories.make_staff(school=side.school, username="own_teacher", role=R.TEACHER),
    }
    return World(side=side, users=users)


def _everything() -> dict[str, list[dict]]:
    """Every row of every school-owned table, and the admin's change log."""
    tables = {m._meta.label: list(m.objects.order_by("pk").values()) for m, _ in TENANT}
    tables["log"] = list(LogEntry.objects.order_by("pk").values())
    return tables


# --- the policy covers everything --------------------------------------------------------------


def test_every_admin_has_a_policy() -> None:
    tenant = {m for m, _ in TENANT}
    missing = sorted(m._meta.label for m in tenant - POLICY.keys())
    assert not missing, f"decide what each role may do with these admins in POLICY: {missing}"
    assert set(POLICY) <= tenant, "POLICY names an admin that is no longer registered"


def test_every_action_has_a_policy() -> None:
    tenant_actions = {(m, name) for m, name in ALL_ACTIONS if m in POLICY}
    missing = sorted(f"{m._meta.label}.{name}" for m, name in tenant_actions - ACTIONS.keys())
    assert not missing, f"decide which roles may run these actions in ACTIONS: {missing}"
    stale = sorted(f"{m._meta.label}.{name}" for m, name in ACTIONS.keys() - tenant_actions)
    assert not stale, f"ACTIONS names actions that no longer exist: {stale}"


# --- every admin, per role -----------------------------------------------------------------------

CASES = [(m, role) for m, _ in TENANT for role in ROLES]


@pytest.mark.parametrize(
    ("model", "role"), CASES, ids=[f"{m._meta.label}-{role}" for m, role in CASES]
)
def test_each_role_gets_exactly_its_grant(world, model, role) -> None:
    grant = POLICY[model]
    client = world.client(role)
    row = world.side.rows[model]
    before = _everything()

    changelist = client.get(_url(model, "changelist"))
    assert changelist.status_code == (200 if role in grant.view else 403)
    add = client.get(_url(model, "add"))
    assert add.status_code == (200 if role in grant.add else 403)
    change = client.get(_url(model, "change", row.pk))
    assert change.status_code == (200 if role in grant.view else 403)
    if change.status_code == 200:
        # Without the change grant the page is read-only: no form to save.
        assert change.context["has_change_permission"] is (role in grant.change)
    delete = client.get(_url(model, "delete", row.pk))
    assert delete.status_code == (200 if role in grant.delete else 403)

    if role not in grant.change:
        assert client.post(_url(model, "change", row.pk), {}).status_code == 403
    if role not in grant.delete:
        assert client.post(_url(model, "delete", row.pk), {"post": "yes"}).status_code == 403
    if role not in grant.change and role not in grant.delete:
        assert _everything() == before


@pytest.mark.parametrize(
    ("model", "model_admin"), OPS_ONLY, ids=[m._meta.label for m, _ in OPS_ONLY]
)
@pytest.mark.parametrize("role", ROLES)
def test_ops_only_admins_refuse_every_role(world, model, model_admin, role) -> None:
    client = world.client(role)
    assert client.get(_url(model, "changelist")).status_code == 403
    assert client.get(_url(model, "add")).status_code == 403


# --- every action, per role ----------------------------------------------------------------------

ACTION_CASES = [(m, name, role) for m, name in ALL_ACTIONS if m in POLICY for role in ROLES]


def _offered(client: Client, model: type[models.Model]) -> set[str]:
    response = client.get(_url(model, "changelist"))
    assert response.status_code == 200
    form = response.context["action_form"]
    return {name for name, _ in form.fields["action"].choices if name} if form else set()


@pytest.mark.parametrize(
    ("model", "action", "role"),
    ACTION_CASES,
    ids=[f"{m._meta.label}.{a}-{role}" for m, a, role in ACTION_CASES],
)
def test_each_action_is_offered_to_its_roles_and_does_nothing_for_others(
    world, model, action, role
) -> None:
    client = world.client(role)
    allowed = role in ACTIONS[(model, action)]
    assert (action in _offered(client, model)) is allowed
    if allowed:
        return
    # A crafted post of an action not offered changes nothing, whatever it asks for.
    rows = [world.side.rows[model].pk]
    if model is Guardian:
        rows = list(Guardian.objects.values_list("pk", flat=True))  # the suppressed one too
    before = _everything()
    paused = world.side.school.sending_paused
    for extra in ({}, {"post": "yes"}, {"select_across": "1"}):
        response = client.post(
            _url(model, "changelist"),
            {"action": action, "_selected_action": rows, "index": 0, **extra},
        )
        assert response.status_code in (200, 302, 403), action
        assert not response.get("Content-Type", "").startswith("text/csv")
    assert _everything() == before
    world.side.school.refresh_from_db()
    assert world.side.school.sending_paused == paused


# --- the cases of the issue ----------------------------------------------------------------------


def _school_form(school: School, **changes: str) -> dict[str, str]:
    data = {
        "name": school.name,
        "time_zone": school.time_zone,
        "sender_name": school.sender_name,
        "sender_email": school.sender_email,
        "quiet_hours_start": "21:00",
        "quiet_hours_end": "07:00",
    }
    return {**data, **changes}


@pytest.mark.parametrize("role", [R.TEACHER, R.OFFICE])
def test_only_a_school_admin_changes_the_school(world, role) -> None:
    """The issue: a teacher set sender_email, the Reply-To of every email, to an outside
    address, and could change the name, time zone and quiet hours."""
    school = world.side.school
    before = School.objects.filter(pk=school.pk).values().get()
    hijack = _school_form(
        school,
        name="Hijacked",
        sender_email="replies@outside.example.com",
        time_zone="UTC",
        quiet_hours_start="03:00",
    )
    response = world.client(role).post(_url(School, "change", school.pk), hijack)
    assert response.status_code == 403
    assert School.objects.filter(pk=school.pk).values().get() == before

    response = world.client(R.ADMIN).post(
        _url(School, "change", school.pk),
        _school_form(school, sender_email="office@own-school.example.org"),
    )
    assert response.status_code == 302
    school.refresh_from_db()
    assert school.sender_email == "office@own-school.example.org"


def test_only_a_school_admin_undoes_a_suppression(world) -> None:
    bounced = Guardian.objects.get(school=world.side.school, suppressed_at__isnull=False)
    for role in (R.TEACHER, R.OFFICE):
        world.client(role).post(
            _url(Guardian, "changelist"),
            {"action": "reactivate", "_selected_action": [bounced.pk], "index": 0},
        )
        bounced.refresh_from_db()
        assert bounced.suppressed_at is not None

    response = world.client(R.ADMIN).post(
        _url(Guardian, "changelist"),
        {"action": "reactivate", "_selected_action": [bounced.pk], "index": 0},
    )
    assert response.status_code == 302
    bounced.refresh_from_db()
    assert bounced.suppressed_at is None and bounced.suppressed_reason == ""
    entry = LogEntry.objects.get(object_id=str(bounced.pk))
    assert entry.user == world.users[R.ADMIN]
    assert "Own hard bounce" in entry.get_change_message()


def test_office_cannot_move_a_suppressed_guardian_to_a_new_address(world) -> None:
    """Changing the address of a suppressed row, then adding the bounced address back on a new
    one, would undo the suppression by the back door."""
    bounced = Guardian.objects.get(school=world.side.school, suppressed_at__isnull=False)
    old_email = bounced.email
    form = {
        "name": "Renamed Parent",
        "email": "fresh@example.net",
        "phone": "",
        "receives_email": "on",
        "students": [world.side.rows[Student].pk],
    }
    office = world.client(R.OFFICE)
    assert office.post(_url(Guardian, "change", bounced.pk), form).status_code == 302
    bounced.refresh_from_db()
    assert bounced.name == "Renamed Parent"  # the rest of the row is theirs to keep up to date
    assert bounced.email == old_email

    admin_client = world.client(R.ADMIN)
    assert admin_client.post(_url(Guardian, "change", bounced.pk), form).status_code == 302
    bounced.refresh_from_db()
    assert bounced.email == "fresh@example.net"


def test_roles_hold_only_in_the_school_where_they_are_held(world) -> None:
    """A school admin who teaches at a second school is a teacher there."""
    user = world.users[R.ADMIN]
    second = factories.make_school(slug="second-school", name="Second School")
    Membership.objects.create(user=user, school=second, role=R.TEACHER)
    second_bounced = factories.make_guardian(
        school=second, name="Second Bounced", suppressed_at=timezone.now()
    )
    own_bounced = Guardian.objects.get(school=world.side.school, suppressed_at__isnull=False)
    client = world.client(R.ADMIN)

    response = client.post(_url(School, "change", second.pk), _school_form(second, name="X"))
    assert response.status_code == 403
    assert client.get(_url(School, "change", second.pk)).context["has_change_permission"] is False
    assert client.get(_url(School, "change", world.side.school.pk)).context["has_change_permission"]

    client.post(
        _url(Guardian, "changelist"),
        {
            "action": "reactivate",
            "_selected_action": [own_bounced.pk, second_bounced.pk],
            "index": 0,
        },
    )
    own_bounced.refresh_from_db()
    second_bounced.refresh_from_db()
    assert own_bounced.suppressed_at is None
    assert second_bounced.suppressed_at is not None

    client.post(
        _url(School, "changelist"),
        {"action": "pause_sending", "_selected_action": [second.pk], "index": 0},
    )
    second.refresh_from_db()
    assert not second.sending_paused

    # People are added only where the user keeps them: the own school, not the second.
    add = client.get(_url(Student, "add"))
    assert list(add.context["adminform"].form.fields["school"].queryset) == [world.side.school]
    response = client.post(
        _url(Student, "add"), {"school": second.pk, "first_name": "New", "last_name": "Kid"}
    )
    assert response.status_code == 200
    assert "school" in response.context["adminform"].form.errors
    assert not Student.objects.filter(school=second).exists()


def test_a_teacher_does_the_work_of_messages(world) -> None:
    """What teachers keep: composing and scheduling a slip to their class, and reading the
    answers (the answers page and the phone-answer form of a slip)."""
    teacher = world.client(R.TEACHER)
    audience = world.side.rows[Audience]
    response = teacher.post(
        _url(Slip, "add"),
        {
            "school": world.side.school.pk,
            "title": "Class picnic",
            "body": "Bring a hat.",
            "consent_question": "May your child come?",
            "audience": audience.pk,
        },
    )
    assert response.status_code == 302, response.context["adminform"].form.errors
    slip = Slip.objects.get(title="Class picnic")
    assert slip.created_by == world.users[R.TEACHER]
    assert teacher.get(reverse("admin:slips_slip_answers", args=[slip.pk])).status_code == 200
    group = world.side.rows[Group]
    response = teacher.post(
        _url(Group, "change", group.pk),
        {"name": "Own Class renamed", "kind": "class", "students": []},
    )
    assert response.status_code == 302
