"""Tenant isolation of the staff admin, proved for every registered model admin.

Two schools, each with staff and one row of every model. Every row of the other school carries
the marker ``ZZOTHER`` in a name, title, email or year level, so "the page does not contain the
marker" catches a leak through any door: rows, filter choices, form choices, search, CSV.

The cases are generated from ``admin.site._registry``: a new tenant admin without a row factory
below fails ``test_every_tenant_admin_has_a_row_factory``, and a new admin that is not a
``TenantAdmin`` must refuse staff outright (``test_non_tenant_admins_refuse_staff``).

Over 400 lines on purpose: the walk over every admin is one table of row factories and
page checks, and its completeness tests need all of it in one place.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

import pytest
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.db import models
from django.test import Client
from django.urls import reverse
from django.urls.converters import IntConverter
from django.utils import timezone

from edsmart.admin_tenancy import TenantAdmin
from notifications.models import (
    Delivery,
    DeliveryEvent,
    DeliveryStatus,
    Mailing,
    ProviderEvent,
)
from slips.models import (
    Audience,
    Broadcast,
    Group,
    Guardian,
    Membership,
    Response,
    ResponseChange,
    RosterImport,
    School,
    Slip,
    Student,
)
from tests import factories

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("web_settings")]

MARK = "ZZOTHER"


@dataclass
class Side:
    school: School
    staff: object
    rows: dict[type[models.Model], models.Model] = field(default_factory=dict)


def _build_side(prefix: str, slug: str, username: str) -> Side:
    low = prefix.lower()
    school = factories.make_school(slug=slug, name=f"{prefix} School")
    staff = factories.make_staff(school=school, username=username)
    student = factories.make_student(
        school=school,
        first_name=f"{prefix}Kid",
        last_name=f"{prefix}Family",
        external_id=f"{prefix}-1",
        year_level=f"{prefix[:6]}9",
    )
    guardian = factories.make_guardian(
        school=school, students=[student], name=f"{prefix} Parent", email=f"{low}.p@example.net"
    )
    factories.make_guardian(
        school=school,
        students=[student],
        name=f"{prefix} Bounced",
        email=f"{low}.bounced@example.net",
        suppressed_at=timezone.now(),
        suppressed_reason=f"{prefix} hard bounce",
    )
    group = factories.make_group(school=school, name=f"{prefix} Class")
    group.students.add(student)
    audience = Audience.objects.create(school=school, name=f"{prefix} Audience")
    audience.groups.add(group)
    slip = factories.make_slip(school=school, audience=audience, title=f"{prefix} Excursion")
    broadcast = factories.make_broadcast(
        school=school, audience=audience, title=f"{prefix} Newsletter"
    )
    response = Response.objects.create(
        school=school,
        slip=slip,
        student=student,
        guardian=guardian,
        consent=True,
        answer=f"{prefix} answer",
        answered_at=timezone.now(),
    )
    ResponseChange.objects.create(
        response=response, consent=True, guardian=guardian, answered_at=timezone.now()
    )
    mailing = factories.make_mailing(slip, body="Hello", recipient_count=1)
    delivery = Delivery.objects.create(
        mailing=mailing,
        school=school,
        email=guardian.email,
        email_normalized=guardian.email,
        recipient_name=guardian.name,
        status=DeliveryStatus.UNKNOWN,
        attempt=1,
        tries=1,
        last_error=f"{prefix} timeout after DATA",
    )
    event = DeliveryEvent.objects.create(
        delivery=delivery,
        attempt=1,
        from_status=DeliveryStatus.SUBMITTING,
        to_status=DeliveryStatus.UNKNOWN,
        detail=f"{prefix} timeout",
    )
    provider_event = ProviderEvent.objects.create(
        delivery=delivery,
        school=school,
        esp="Mailgun",
        event_type="bounced",
        kind=ProviderEvent.Kind.HARD_BOUNCE,
        reason=f"{prefix} no such mailbox",
        email=guardian.email,
        event_id=f"{prefix}-event-1",
        outcome="recorded",
    )
    roster_import = RosterImport.objects.create(
        school=school,
        filename=f"{prefix}-roster.csv",
        csv_text=f"student_external_id\n{prefix}-1\n",
        status=RosterImport.Status.PREVIEWED,
        preview={"counts": {}, "fingerprint": ""},
    )
    rows = {
        School: school,
        Student: student,
        Guardian: guardian,
        Group: group,
        Audience: audience,
        Slip: slip,
        Broadcast: broadcast,
        Response: response,
        Mailing: mailing,
        Delivery: delivery,
        DeliveryEvent: event,
        RosterImport: roster_import,
        ProviderEvent: provider_event,
    }
    return Side(school=school, staff=staff, rows=rows)


# A term that finds the own school's row of each model through its admin search.
OWN_SEARCH = {
    School: "Own School",
    Student: "OwnKid",
    Guardian: "own.p@",
    Group: "Own Class",
    Audience: "Own Audience",
    Slip: "Own Excursion",
    Broadcast: "Own Newsletter",
    Response: "OwnKid",
    Mailing: "Own Excursion",
    Delivery: "own.p@",
    DeliveryEvent: "own.p@",
    RosterImport: "Own-roster",
    ProviderEvent: "own.p@",
}


@pytest.fixture
def world() -> dict[str, Side]:
    return {
        "own": _build_side("Own", "own-school", "own_staff"),
        "other": _build_side(MARK, "zz-school", "zzother_staff"),
    }


@pytest.fixture
def own_client(world) -> Client:
    client = Client()
    client.force_login(world["own"].staff)
    return client


REGISTRY = sorted(admin.site._registry.items(), key=lambda item: item[0]._meta.label)
TENANT = [(m, a) for m, a in REGISTRY if isinstance(a, TenantAdmin)]
OTHERS = [(m, a) for m, a in REGISTRY if not isinstance(a, TenantAdmin)]


def _ids(items: list) -> list[str]:
    return [item[0]._meta.label for item in items]


def _url(model: type[models.Model], view: str, *args: object) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


def _result_pks(response) -> set[int]:
    return {obj.pk for obj in response.context["cl"].result_list}


def _snapshot(obj: models.Model) -> dict:
    return type(obj).objects.filter(pk=obj.pk).values().get()


def test_every_tenant_admin_has_a_row_factory(world) -> None:
    missing = [m._meta.label for m, _ in TENANT if m not in world["own"].rows]
    assert not missing, f"add a row for these admins to _build_side: {missing}"
    assert {School, Student, Guardian, Group, Audience, Slip, Broadcast, Response} <= {
        m for m, _ in TENANT
    }
    assert {Mailing, Delivery} <= {m for m, _ in TENANT}


@pytest.mark.parametrize(("model", "model_admin"), TENANT, ids=_ids(TENANT))
def test_changelist_shows_only_own_rows(world, own_client, model, model_admin) -> None:
    response = own_client.get(_url(model, "changelist"))
    assert response.status_code == 200
    pks = _result_pks(response)
    assert world["own"].rows[model].pk in pks
    assert world["other"].rows[model].pk not in pks
    assert MARK not in response.content.decode()  # rows, filter choices, counts


@pytest.mark.parametrize(("model", "model_admin"), TENANT, ids=_ids(TENANT))
def test_other_schools_object_by_url_is_404(world, own_client, model, model_admin) -> None:
    other = world["other"].rows[model]
    for view in ("change", "delete", "history"):
        assert own_client.get(_url(model, view, other.pk)).status_code == 404, view
    assert own_client.post(_url(model, "change", other.pk), {}).status_code == 404
    assert own_client.post(_url(model, "delete", other.pk), {"post": "yes"}).status_code == 404
    assert type(other).objects.filter(pk=other.pk).exists()
    # The own object opens, and its form offers nothing of the other school.
    own_page = own_client.get(_url(model, "change", world["own"].rows[model].pk))
    assert own_page.status_code == 200
    assert MARK not in own_page.content.decode()


@pytest.mark.parametrize(("model", "model_admin"), TENANT, ids=_ids(TENANT))
def test_search_finds_only_own_rows(world, own_client, model, model_admin) -> None:
    assert model_admin.search_fields, "every tenant admin should be searchable"
    url = _url(model, "changelist")
    hit = own_client.get(url, {"q": OWN_SEARCH[model]})
    assert world["own"].rows[model].pk in _result_pks(hit)
    miss = own_client.get(url, {"q": MARK})
    assert _result_pks(miss) == set()
    # The other school's own search term works the same way: still nothing.
    miss = own_client.get(url, {"q": OWN_SEARCH[model].replace("Own", MARK).replace("own", "zz")})
    assert world["other"].rows[model].pk not in _result_pks(miss)


def _relation_fields() -> list[tuple[type[models.Model], models.Field]]:
    """Every (source model, FK/M2M field) whose target admin could serve autocomplete."""
    found = []
    for model, _ in REGISTRY:
        for f in model._meta.get_fields():
            if not (f.is_relation and f.concrete and (f.many_to_one or f.many_to_many)):
                continue
            target = admin.site._registry.get(f.related_model)
            if target is not None and target.search_fields:
                found.append((model, f))
    return found


RELATIONS = _relation_fields()


def test_autocomplete_fields_are_all_covered() -> None:
    covered = {(m, f.name) for m, f in RELATIONS}
    for model, model_admin in REGISTRY:
        for name in model_admin.autocomplete_fields:
            assert (model, name) in covered


@pytest.mark.parametrize(
    ("model", "db_field"), RELATIONS, ids=[f"{m._meta.label}.{f.name}" for m, f in RELATIONS]
)
def test_autocomplete_returns_only_own_rows(world, own_client, model, db_field) -> None:
    target = db_field.related_model
    response = own_client.get(
        reverse("admin:autocomplete"),
        {
            "app_label": model._meta.app_label,
            "model_name": model._meta.model_name,
            "field_name": db_field.name,
            "term": "",
        },
    )
    if not isinstance(admin.site._registry[target], TenantAdmin):
        assert response.status_code == 403
        return
    assert response.status_code == 200
    ids = {int(r["id"]) for r in response.json()["results"]}
    assert world["own"].rows[target].pk in ids
    assert world["other"].rows[target].pk not in ids
    assert MARK not in response.content.decode()
    marked = own_client.get(
        reverse("admin:autocomplete"),
        {
            "app_label": model._meta.app_label,
            "model_name": model._meta.model_name,
            "field_name": db_field.name,
            "term": MARK,
        },
    )
    assert marked.json()["results"] == []


@pytest.mark.parametrize(("model", "model_admin"), TENANT, ids=_ids(TENANT))
def test_list_filter_choices_do_not_leak(world, model, model_admin) -> None:
    """A user in two schools gets the school filter: it lists their schools, not the other."""
    third = factories.make_school(slug="third-school", name="Third School")
    staff = world["own"].staff
    Membership.objects.create(user=staff, school=third)
    client = Client()
    client.force_login(staff)
    url = _url(model, "changelist")
    page = client.get(url)
    assert page.status_code == 200
    body = page.content.decode()
    assert MARK not in body
    if model is not School:
        assert "Third School" in body  # the school filter is shown, with the user's schools
        crafted = client.get(url, {"school": world["other"].school.pk})
        assert crafted.status_code == 200
        assert _result_pks(crafted) == set()


def _action_cases() -> list[tuple[type[models.Model], str]]:
    from django.test import RequestFactory

    cases = []
    for model, model_admin in TENANT:
        request = RequestFactory().get("/")
        request.user = get_user_model()(is_staff=True, is_superuser=True, is_active=True)
        cases += [(model, name) for name in model_admin.get_actions(request)]
    return cases


ACTIONS = _action_cases()


@pytest.mark.parametrize(
    ("model", "action"), ACTIONS, ids=[f"{m._meta.label}.{a}" for m, a in ACTIONS]
)
def test_actions_ignore_other_schools_ids(world, own_client, model, action) -> None:
    other = world["other"].rows[model]
    before = {m: _snapshot(obj) for m, obj in world["other"].rows.items()}
    events_before = DeliveryEvent.objects.filter(delivery__school=world["other"].school).count()
    paused_before = world["other"].school.sending_paused
    for extra in ({}, {"post": "yes"}, {"select_across": "1"}):
        response = own_client.post(
            _url(model, "changelist"),
            {"action": action, "_selected_action": [other.pk], "index": 0, **extra},
        )
        assert response.status_code in (200, 302), action
        assert MARK not in response.content.decode()
    after = {m: _snapshot(obj) for m, obj in world["other"].rows.items()}
    assert after == before
    assert (
        DeliveryEvent.objects.filter(delivery__school=world["other"].school).count()
        == events_before
    )
    world["other"].school.refresh_from_db()
    assert world["other"].school.sending_paused == paused_before


CSV_ADMINS = [(m, a) for m, a in TENANT if a.csv_fields]


def test_csv_export_exists_for_people_and_responses() -> None:
    assert {Student, Guardian, Response} <= {m for m, _ in CSV_ADMINS}


@pytest.mark.parametrize(("model", "model_admin"), CSV_ADMINS, ids=_ids(CSV_ADMINS))
def test_csv_export_contains_only_own_rows(world, own_client, model, model_admin) -> None:
    own, other = world["own"].rows[model], world["other"].rows[model]
    for extra in ({}, {"select_across": "1"}):
        response = own_client.post(
            _url(model, "changelist"),
            {"action": "export_csv", "_selected_action": [own.pk, other.pk], "index": 0, **extra},
        )
        assert response.status_code == 200
        assert response["Content-Type"].startswith("text/csv")
        rows = list(csv.reader(io.StringIO(response.content.decode())))
        assert len(rows) >= 2  # header and the own row
        text = response.content.decode()
        assert "Own" in text or "own" in text
        assert MARK not in text


def test_slip_responses_csv_contains_only_own_rows(world, own_client) -> None:
    response = own_client.post(
        _url(Slip, "changelist"),
        {
            "action": "export_responses_csv",
            "_selected_action": [world["own"].rows[Slip].pk, world["other"].rows[Slip].pk],
            "index": 0,
        },
    )
    text = response.content.decode()
    assert "Own answer" in text
    assert MARK not in text


ADDABLE = [(m, a) for m, a in TENANT if a.staff_can_add]


@pytest.mark.parametrize(("model", "model_admin"), ADDABLE, ids=_ids(ADDABLE))
def test_add_form_offers_only_own_choices(world, own_client, model, model_admin) -> None:
    response = own_client.get(_url(model, "add"))
    assert response.status_code == 200
    body = response.content.decode()
    assert MARK not in body
    form = response.context["adminform"].form
    school_field = form.fields.get("school")
    if school_field is not None:
        # One school: it is set for them and not shown.
        assert school_field.initial == world["own"].school.pk
        assert school_field.widget.is_hidden
        assert list(school_field.queryset) == [world["own"].school]
    for name, form_field in form.fields.items():
        queryset = getattr(form_field, "queryset", None)
        if queryset is None:
            continue
        other_row = world["other"].rows.get(queryset.model)
        if other_row is not None:
            assert not queryset.filter(pk=other_row.pk).exists(), name


def test_crafted_add_posts_with_other_schools_ids_are_refused(world, own_client) -> None:
    other = world["other"]
    own = world["own"]
    # A guardian for the own school, linked to the other school's student.
    response = own_client.post(
        _url(Guardian, "add"),
        {
            "school": own.school.pk,
            "name": "Sneaky",
            "email": "sneaky@example.net",
            "receives_email": "on",
            "students": [other.rows[Student].pk],
        },
    )
    assert response.status_code == 200
    assert response.context["adminform"].form.errors["students"]
    assert not Guardian.objects.filter(name="Sneaky").exists()
    # A student created straight into the other school.
    response = own_client.post(
        _url(Student, "add"), {"school": other.school.pk, "first_name": "X", "last_name": "Y"}
    )
    assert response.status_code == 200
    assert "school" in response.context["adminform"].form.errors
    assert not Student.objects.filter(school=other.school, first_name="X").exists()
    # A slip pointed at the other school's audience.
    response = own_client.post(
        _url(Slip, "add"),
        {
            "school": own.school.pk,
            "title": "Sneaky slip",
            "body": "Hello",
            "consent_question": "OK?",
            "audience": other.rows[Audience].pk,
        },
    )
    assert response.status_code == 200
    assert "audience" in response.context["adminform"].form.errors
    assert not Slip.objects.filter(title="Sneaky slip").exists()


def test_add_sets_the_only_school_automatically(world, own_client) -> None:
    response = own_client.post(
        _url(Group, "add"), {"school": world["own"].school.pk, "name": "New Class", "kind": "class"}
    )
    assert response.status_code == 302
    assert Group.objects.get(name="New Class").school == world["own"].school


def test_multi_school_user_cannot_mix_schools_in_one_form(world) -> None:
    third = factories.make_school(slug="third-school", name="Third School")
    third_group = factories.make_group(school=third, name="Third Class")
    staff = world["own"].staff
    Membership.objects.create(user=staff, school=third)
    client = Client()
    client.force_login(staff)
    add = client.get(_url(Audience, "add"))
    assert not add.context["adminform"].form.fields["school"].widget.is_hidden
    response = client.post(
        _url(Audience, "add"),
        {"school": world["own"].school.pk, "name": "Mixed", "groups": [third_group.pk]},
    )
    assert response.status_code == 200
    assert "Belongs to another school" in str(response.context["adminform"].form.errors)
    assert not Audience.objects.filter(name="Mixed").exists()


def test_school_of_an_existing_row_cannot_be_changed(world, own_client) -> None:
    third = factories.make_school(slug="third-school", name="Third School")
    Membership.objects.create(user=world["own"].staff, school=third)
    group = world["own"].rows[Group]
    response = own_client.post(
        _url(Group, "change", group.pk),
        {"school": third.pk, "name": "Renamed", "kind": "class", "students": []},
    )
    assert response.status_code == 302
    group.refresh_from_db()
    assert group.name == "Renamed"
    assert group.school == world["own"].school


def test_staff_cannot_create_or_delete_schools(world, own_client) -> None:
    assert own_client.get(_url(School, "add")).status_code == 403
    own_school = world["own"].school
    assert (
        own_client.post(_url(School, "delete", own_school.pk), {"post": "yes"}).status_code == 403
    )
    assert School.objects.filter(pk=own_school.pk).exists()


def test_only_school_admins_delete(world) -> None:
    school = world["own"].school
    teacher = factories.make_staff(school=school, role=Membership.Role.TEACHER)
    student = factories.make_student(school=school, first_name="Deletable")
    client = Client()
    client.force_login(teacher)
    assert client.post(_url(Student, "delete", student.pk), {"post": "yes"}).status_code == 403
    assert Student.objects.filter(pk=student.pk).exists()
    admin_client = Client()
    admin_client.force_login(world["own"].staff)
    assert (
        admin_client.post(_url(Student, "delete", student.pk), {"post": "yes"}).status_code == 302
    )
    assert not Student.objects.filter(pk=student.pk).exists()


@pytest.mark.parametrize(("model", "model_admin"), OTHERS, ids=_ids(OTHERS))
def test_non_tenant_admins_refuse_staff(world, own_client, model, model_admin) -> None:
    """Anything not school-scoped (users, memberships, beat schedules, the global switch) is
    for ops only: staff get 403 and do not see it on the index."""
    assert own_client.get(_url(model, "changelist")).status_code == 403
    assert own_client.get(_url(model, "add")).status_code == 403
    index = own_client.get(reverse("admin:index"))
    assert index.status_code == 200
    listed = {
        (app["app_label"], m["object_name"])
        for app in index.context["app_list"]
        for m in app["models"]
    }
    assert (model._meta.app_label, model._meta.object_name) not in listed


def test_staff_index_lists_the_school_models(world, own_client) -> None:
    index = own_client.get(reverse("admin:index"))
    listed = {
        (app["app_label"], m["object_name"])
        for app in index.context["app_list"]
        for m in app["models"]
    }
    for model, _ in TENANT:
        assert (model._meta.app_label, model._meta.object_name) in listed
    for model, _ in OTHERS:
        assert (model._meta.app_label, model._meta.object_name) not in listed


def test_superuser_sees_every_school(world) -> None:
    ops = get_user_model().objects.create_superuser("ops", "ops@example.org", "pw-for-tests-only")
    client = Client()
    client.force_login(ops)
    for model, _ in TENANT:
        pks = _result_pks(client.get(_url(model, "changelist")))
        assert {world["own"].rows[model].pk, world["other"].rows[model].pk} <= pks, model


def test_staff_without_membership_sees_nothing(world) -> None:
    stray = get_user_model().objects.create_user("stray", password="pw-for-tests-only")
    stray.is_staff = True
    stray.save()
    client = Client()
    client.force_login(stray)
    for model, _ in TENANT:
        assert client.get(_url(model, "changelist")).status_code == 403, model


def _object_urls() -> list[tuple[type[models.Model], str, dict[str, object]]]:
    """Every named admin URL that takes an object id, including each admin's own extra views
    (transitions, a slip's answers, export and phone-answer form, reminders): (model, url
    name, a value for each other path argument: 1 for a number, else "cancel")."""
    found = []
    for model, model_admin in TENANT:
        for pattern in model_admin.get_urls():
            converters = getattr(pattern.pattern, "converters", {})
            if pattern.name and "object_id" in converters:
                others = {
                    name: 1 if isinstance(converter, IntConverter) else "cancel"
                    for name, converter in converters.items()
                    if name != "object_id"
                }
                found.append((model, pattern.name, others))
    return found


OBJECT_URLS = _object_urls()


def test_object_urls_include_the_extra_views() -> None:
    names = {name for _, name, _ in OBJECT_URLS}
    assert {
        "slips_slip_transition",
        "slips_slip_answers",
        "slips_slip_answers_export",
        "slips_slip_answer_record",
        "slips_slip_reminders",
        "slips_slip_remind_now",
        "slips_slip_reminder_cancel",
        "slips_rosterimport_confirm",
        "notifications_mailing_evidence",
        "notifications_mailing_evidence_csv",
    } <= names


@pytest.mark.parametrize(
    ("model", "name", "others"), OBJECT_URLS, ids=[name for _, name, _ in OBJECT_URLS]
)
def test_every_object_url_answers_404_for_another_schools_id(
    world, own_client, model, name, others
) -> None:
    """A view that takes an object id loads it through the tenant queryset: the other school's
    id is a 404 (or a 405 before the object is even looked up), never a page or a change."""
    before = {m: _snapshot(obj) for m, obj in world["other"].rows.items()}
    responses_before = Response.objects.filter(school=world["other"].school).count()
    kwargs = {"object_id": world["other"].rows[model].pk, **others}
    url = reverse(f"admin:{name}", kwargs=kwargs)
    student = world["other"].rows[Student].pk
    got = {
        "GET": own_client.get(url).status_code,
        "POST": own_client.post(url, {"student": student, "consent": "no"}).status_code,
    }
    assert set(got.values()) <= {404, 405}, got
    assert 404 in got.values(), got
    after = {m: _snapshot(obj) for m, obj in world["other"].rows.items()}
    assert after == before
    assert Response.objects.filter(school=world["other"].school).count() == responses_before
