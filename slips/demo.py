"""A demo school to click around in: staff login, year levels, classes and families.

Everything is derived from the family number, with no randomness, and every row is found
before it is created, so seeding twice leaves the database as seeding once did. Families go
in through the real roster import, so the demo also exercises it.

Addresses use the reserved ``example.org`` domain: nothing seeded here can reach a real person.

It touches only schools it made. A demo school is recognised by its demo login: the member
``<slug>-admin`` whose address is ``admin@<slug>.example.org`` (a reserved domain no real
account has). Users and memberships are changed only by ops, so a school's own staff cannot
make a real school look like a demo one. A password is set only when the login is created,
never reset: seeding again, or with another ``DEMO_PASSWORD``, leaves it as it is.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.db import transaction
from django.utils import timezone

from slips.models import Audience, Group, Membership, School, Slip
from slips.roster import roster_import
from slips.services import message_schedule

# A demo login, printed by seed_demo and documented in the README; override with DEMO_PASSWORD.
DEFAULT_DEMO_PASSWORD = "edsmart-demo"  # noqa: S105
WHOLE_SCHOOL_AUDIENCE = "Whole school"
DEMO_SLIP_TITLE = "Excursion to the zoo"
YEAR_LEVELS = ("1", "2", "3", "4", "5", "6")
CLASS_LETTERS = ("A", "B")

_SURNAMES = (
    "Nguyen", "Smith", "Patel", "Williams", "Chen", "Brown", "Singh", "Jones", "Kelly", "Wilson",
    "Taylor", "Ali", "Martin", "Lee", "Walker", "Costa", "White", "Khan", "Harris", "Murphy",
)  # fmt: skip
_CHILD_NAMES = (
    "Olivia", "Noah", "Amelia", "Oliver", "Isla", "Leo", "Mia", "Jack", "Ava", "Henry",
    "Zara", "Lucas", "Ruby", "Arlo", "Chloe", "Theo", "Grace", "Kai", "Ella", "Finn",
)  # fmt: skip
_PARENT_NAMES = (
    "Sarah", "David", "Priya", "James", "Mei", "Daniel", "Fatima", "Michael", "Emma", "Tom",
    "Aisha", "Ben", "Laura", "Sam", "Hannah", "Raj", "Kate", "Luis", "Nina", "Paul",
)  # fmt: skip


class NotADemoSchool(Exception):
    """The school (or the demo login's username) exists and was not made by ``demo_seed``."""


@dataclass(frozen=True)
class DemoResult:
    school: School
    username: str
    password: str | None  # None: the login existed and its password is not the demo one now
    students: int
    guardians: int
    groups: int
    slip: Slip


def demo_password() -> str:
    return os.environ.get("DEMO_PASSWORD") or DEFAULT_DEMO_PASSWORD


def demo_roster_csv(*, families: int) -> str:
    """The demo families as a roster file, the same text for the same ``families``.

    Every fourth family has two guardians (one of whom does not want email in every eighth),
    every third has two children (siblings), and family 2 has two guardians who share one
    family mailbox, which recipient resolution must collapse into one email.
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        [
            "student_external_id",
            "student_first_name",
            "student_last_name",
            "year_level",
            "groups",
            "guardian_name",
            "guardian_email",
            "guardian_phone",
            "guardian_receives_email",
        ]
    )
    child_no = 0
    for family in range(1, families + 1):
        surname = _SURNAMES[(family - 1) % len(_SURNAMES)]
        tag = f"{surname.lower()}{family}"
        p1 = _PARENT_NAMES[(family - 1) % len(_PARENT_NAMES)]
        p2 = _PARENT_NAMES[(family + 6) % len(_PARENT_NAMES)]
        adults = [(f"{p1} {surname}", f"{p1.lower()}.{tag}@example.org", "yes")]
        if family == 2:
            adults = [
                (f"{p1} {surname}", f"family.{tag}@example.org", "yes"),
                (f"{p2} {surname}", f"family.{tag}@example.org", "yes"),
            ]
        elif family % 4 == 0:
            opt = "no" if family % 8 == 0 else "yes"
            adults.append((f"{p2} {surname}", f"{p2.lower()}.{tag}@example.org", opt))
        for child in range(1 + (family % 3 == 0)):
            year = YEAR_LEVELS[child_no % len(YEAR_LEVELS)]
            letter = CLASS_LETTERS[(child_no // len(YEAR_LEVELS)) % len(CLASS_LETTERS)]
            first = _CHILD_NAMES[child_no % len(_CHILD_NAMES)]
            child_no += 1
            for n, (name, email, receives) in enumerate(adults, start=1):
                writer.writerow(
                    [
                        f"DEMO-{family:04d}-{child + 1}",
                        first,
                        surname,
                        year,
                        f"Year {year};{year}{letter}",
                        name,
                        email,
                        f"0400 {family:03d} {n:03d}",
                        receives,
                    ]
                )
    return out.getvalue()


def demo_username(slug: str) -> str:
    return f"{slug}-admin"


def demo_login_email(slug: str) -> str:
    return f"admin@{slug}.example.org"


def is_demo_school(school: School) -> bool:
    """Whether ``demo_seed`` made this school: its demo login is a member of it."""
    return Membership.objects.filter(
        school=school,
        user__username=demo_username(school.slug),
        user__email__iexact=demo_login_email(school.slug),
    ).exists()


def demo_seed(*, slug: str = "demo", families: int = 20) -> DemoResult:
    """Create or bring up to date the demo school; safe to run any number of times.

    Raises ``NotADemoSchool`` for a school, or a ``<slug>-admin`` user, that it did not make.
    """
    if families < 1:
        raise ValueError("A demo school needs at least one family.")
    username = demo_username(slug)
    with transaction.atomic():
        school = School.objects.select_for_update().filter(slug=slug).first()
        if school is not None and not is_demo_school(school):
            raise NotADemoSchool(
                f"School '{slug}' exists and was not made by seed_demo (it has no demo login "
                f"{username} <{demo_login_email(slug)}>); it is left alone. Pick another slug."
            )
        user = get_user_model().objects.filter(username=username).first()
        if user is not None and user.email.lower() != demo_login_email(slug).lower():
            raise NotADemoSchool(
                f"A user {username} exists and is not a demo login (its address is not "
                f"{demo_login_email(slug)}); it is left alone. Pick another slug."
            )
        if school is None:
            school = School.objects.create(
                slug=slug,
                name=f"{slug.replace('-', ' ').title()} Primary School",
                time_zone="Australia/Sydney",
                sender_name=f"{slug.replace('-', ' ').title()} Primary Office",
                sender_email=f"office@{slug}.example.org",
            )
        password: str | None = demo_password()
        if user is None:
            user = get_user_model().objects.create_user(
                username=username,
                email=demo_login_email(slug),
                password=password,
                is_staff=True,
            )
        elif not user.check_password(password):
            # Never reset: someone changed it, or DEMO_PASSWORD differs from the first run.
            password = None
        Membership.objects.get_or_create(
            user=user, school=school, defaults={"role": Membership.Role.ADMIN}
        )
        for year in YEAR_LEVELS:
            _group(school, f"Year {year}", Group.Kind.YEAR)
            for letter in CLASS_LETTERS:
                _group(school, f"{year}{letter}", Group.Kind.CLASS)
        result = roster_import(school=school, file=io.StringIO(demo_roster_csv(families=families)))
        if not Audience.objects.filter(school=school, whole_school=True).exists():
            Audience.objects.create(school=school, name=WHOLE_SCHOOL_AUDIENCE, whole_school=True)
        slip = _demo_slip(school=school, created_by=user)
    return DemoResult(
        school=school,
        username=username,
        password=password,
        students=result.students,
        guardians=result.guardians,
        groups=Group.objects.filter(school=school).count(),
        slip=slip,
    )


def _demo_slip(*, school: School, created_by: object) -> Slip:
    """One slip scheduled for now, made once, so the mail catcher soon shows what parents get."""
    existing = Slip.objects.filter(school=school, title=DEMO_SLIP_TITLE).first()
    if existing is not None:
        return existing
    slip = Slip.objects.create(
        school=school,
        title=DEMO_SLIP_TITLE,
        body=(
            "Year 3 and 4 are visiting the zoo next Friday.\n\n"
            "Students need a hat, water and a packed lunch. The bus leaves at 9:00."
        ),
        consent_question="May your child come on the excursion?",
        free_text_question="Anything we should know (allergies, medication)?",
        due_at=timezone.now() + dt.timedelta(days=14),
        audience=Audience.objects.filter(school=school, whole_school=True).first(),
        created_by=created_by,
    )
    return message_schedule(message=slip, send_at=timezone.now())


def _group(school: School, name: str, kind: str) -> Group:
    group = Group.objects.filter(school=school, name__iexact=name).first()
    if group is None:
        group = Group.objects.create(school=school, name=name, kind=kind)
    return group
