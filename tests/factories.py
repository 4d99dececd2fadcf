"""Factory functions for tests: small, explicit, and always tenant-correct."""

from __future__ import annotations

import datetime as dt
import itertools

from django.apps import apps
from django.contrib.auth import get_user_model
from django.db import connection
from django.utils import timezone

from notifications import dispatch
from notifications.models import Delivery, Mailing
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
from slips.services import message_schedule

_seq = itertools.count(1)


def empty_app_tables() -> None:
    """Delete every row of the school and sending apps, committed.

    For tests that run with real commits (``transaction=True``) and need a clean database
    more often than once per test, e.g. once per Hypothesis example.
    """
    tables = [
        model._meta.db_table
        for label in ("slips", "notifications")
        for model in apps.get_app_config(label).get_models(include_auto_created=True)
    ]
    with connection.cursor() as cur:
        cur.execute("TRUNCATE " + ", ".join(connection.ops.quote_name(t) for t in tables))


def make_school(*, slug: str | None = None, **fields: object) -> School:
    n = next(_seq)
    slug = slug or f"school-{n}"
    fields.setdefault("name", f"School {slug}")
    fields.setdefault("sender_email", f"office@{slug}.example.org")
    fields.setdefault("time_zone", "Australia/Sydney")
    return School.objects.create(slug=slug, **fields)


def make_staff(
    *, school: School, username: str | None = None, role: str = Membership.Role.ADMIN
) -> object:
    user = get_user_model().objects.create_user(
        username=username or f"staff{next(_seq)}", password="pw-for-tests-only", is_staff=True
    )
    Membership.objects.create(user=user, school=school, role=role)
    return user


def make_student(*, school: School, **fields: object) -> Student:
    n = next(_seq)
    fields.setdefault("first_name", f"Kid{n}")
    fields.setdefault("last_name", "Tester")
    fields.setdefault("year_level", "3")
    return Student.objects.create(school=school, **fields)


def make_guardian(
    *, school: School, students: list[Student] = (), email: str | None = None, **fields: object
) -> Guardian:
    n = next(_seq)
    fields.setdefault("name", f"Parent{n}")
    guardian = Guardian.objects.create(
        school=school, email=email if email is not None else f"parent{n}@example.net", **fields
    )
    guardian.students.set(students)
    return guardian


def make_family(
    *, school: School, children: int = 1, guardians: int = 1, group: Group | None = None
) -> tuple[list[Student], list[Guardian]]:
    kids = [make_student(school=school) for _ in range(children)]
    adults = [make_guardian(school=school, students=kids) for _ in range(guardians)]
    if group is not None:
        group.students.add(*kids)
    return kids, adults


def make_group(*, school: School, name: str | None = None, kind: str = Group.Kind.CLASS) -> Group:
    return Group.objects.create(school=school, name=name or f"Class {next(_seq)}", kind=kind)


def make_roster_groups(*, school: School) -> dict[str, Group]:
    """The year levels and classes the example rosters name, and a custom group ("Choir")."""
    return {
        name: make_group(school=school, name=name, kind=kind)
        for name, kind in [
            ("Year 3", Group.Kind.YEAR),
            ("Year 5", Group.Kind.YEAR),
            ("3A", Group.Kind.CLASS),
            ("3B", Group.Kind.CLASS),
            ("5B", Group.Kind.CLASS),
            ("Choir", Group.Kind.CUSTOM),
        ]
    }


def make_audience(
    *,
    school: School,
    whole_school: bool = True,
    groups: list[Group] = (),
    students: list[Student] = (),
) -> Audience:
    audience = Audience.objects.create(
        school=school, name=f"Audience {next(_seq)}", whole_school=whole_school
    )
    audience.groups.set(groups)
    audience.students.set(students)
    return audience


def _sendable_fields(school: School, audience: Audience | None, fields: dict) -> dict:
    fields.setdefault("title", f"Message {next(_seq)}")
    fields.setdefault("body", "Hello families,\n\nPlease read this.")
    fields.setdefault("status", SendStatus.DRAFT)
    fields.setdefault("audience", audience or make_audience(school=school))
    return fields


def make_slip(*, school: School, audience: Audience | None = None, **fields: object) -> Slip:
    fields = _sendable_fields(school, audience, fields)
    fields.setdefault("due_at", timezone.now() + dt.timedelta(days=7))
    return Slip.objects.create(school=school, **fields)


def make_broadcast(
    *, school: School, audience: Audience | None = None, **fields: object
) -> Broadcast:
    return Broadcast.objects.create(school=school, **_sendable_fields(school, audience, fields))


def make_mailing(source: Slip | Broadcast, **fields: object) -> Mailing:
    """A mailing of ``source`` as the dispatcher makes it (its subject and body), no rows."""
    is_slip = isinstance(source, Slip)
    fields.setdefault("subject", source.title)
    fields.setdefault("body", source.body)
    fields.setdefault("school", source.school)
    return Mailing.objects.create(
        kind=Mailing.Kind.SLIP if is_slip else Mailing.Kind.BROADCAST,
        slip=source if is_slip else None,
        broadcast=None if is_slip else source,
        **fields,
    )


# --- messages sent on their way, as beat's dispatcher would ----------------------------------


def dispatch_now(message: Slip | Broadcast) -> int:
    """Schedule ``message`` for now and run the dispatcher once; returns the mailing id."""
    message_schedule(message=message, send_at=timezone.now())
    [mailing_id] = dispatch.dispatch_due()
    return mailing_id


def dispatched_deliveries(message: Slip | Broadcast) -> list[Delivery]:
    """``dispatch_now``, then the mailing's deliveries in creation order."""
    return list(Delivery.objects.filter(mailing_id=dispatch_now(message)).order_by("pk"))


def broadcast_dispatched(*, school: School, families: int = 3) -> tuple[Broadcast, int]:
    """A whole-school broadcast to ``families`` new families, dispatched now:
    (the broadcast, as the dispatcher left it; the mailing id)."""
    for _ in range(families):
        make_family(school=school)
    broadcast = make_broadcast(school=school)
    mailing_id = dispatch_now(broadcast)
    broadcast.refresh_from_db()
    return broadcast, mailing_id


def family_slip_dispatched(
    *, school: School, children: int = 2, guardians: int = 1, **fields: object
) -> tuple[list[Delivery], list[Student], list[Guardian], Slip]:
    """One new family's slip, dispatched now: (deliveries, children, guardians, slip)."""
    kids, adults = make_family(school=school, children=children, guardians=guardians)
    audience = make_audience(school=school, whole_school=False, students=kids)
    slip = make_slip(school=school, audience=audience, **fields)
    return dispatched_deliveries(slip), kids, adults, slip
