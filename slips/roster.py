"""Roster import: one CSV of students and their guardians for one school.

The whole file is checked before anything is written, and every problem is reported with its
line number at once: a school fixing a spreadsheet wants the full list, not one error per try,
and a half-imported roster (some families updated, some not) is worse than none.

The columns and the matching rules are documented for schools in ``docs/roster-import.md``.
In short: one row per (student, guardian) pair; students are matched by external id, guardians
by normalized email (so siblings share one guardian); a blank cell never erases stored data.

Reading and checking the file is ``slips.roster_csv``; this module is the public entry and the
writing. ``RowError`` is re-exported here, where callers import the import's errors from.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TextIO

from django.db import connection, transaction

from slips.models import Group, Guardian, School, Student
from slips.roster_csv import GuardianEntry, Parser, RowError, guardian_key

__all__ = ["RosterError", "RosterResult", "RowError", "roster_import"]

# Groups whose membership the roster owns. Custom groups are built by staff in the admin, so an
# import only ever adds students to them.
ROSTER_GROUP_KINDS = (Group.Kind.CLASS, Group.Kind.YEAR)


class RosterError(Exception):
    """The file was not imported; ``errors`` says why, line by line."""

    def __init__(self, errors: list[RowError]) -> None:
        self.errors = sorted(errors, key=lambda e: e.line)
        super().__init__(str(self))

    def __str__(self) -> str:
        count = len(self.errors)
        head = f"{count} problem{'' if count == 1 else 's'} in the roster; nothing was imported."
        return "\n".join([head, *(str(e) for e in self.errors)])


@dataclass(frozen=True)
class RosterResult:
    students: int
    guardians: int
    students_created: int
    guardians_created: int

    def __str__(self) -> str:
        return f"Imported {self.students} students, {self.guardians} guardians"


def roster_import(*, school: School, file: TextIO) -> RosterResult:
    """Import a roster CSV for one school, all of it or nothing.

    Raises ``RosterError`` listing every bad row. The school row is locked for the duration so
    two imports for one school run one after the other instead of both creating the same
    guardians (guardian addresses are not unique in the database: families share mailboxes).
    """
    with transaction.atomic():
        School.objects.select_for_update().filter(pk=school.pk).exists()
        groups = {g.name.casefold(): g for g in Group.objects.filter(school=school)}
        parser = Parser(groups_by_name=groups)
        parser.parse(file)
        if parser.errors:
            raise RosterError(parser.errors)
        result = _write(school=school, parser=parser)
    if result.students_created + result.guardians_created >= ANALYZE_AFTER_ROWS:
        _refresh_planner_statistics()
    return result


# A school imported and sent to within the minute would otherwise be planned with the old,
# near-empty statistics: measured here, recipient resolution for 3,000 families then took 15 s
# (a nested loop over every guardian-student pair) instead of milliseconds.
ANALYZE_AFTER_ROWS = 200


def _refresh_planner_statistics() -> None:
    tables = [
        Student._meta.db_table,
        Guardian._meta.db_table,
        Guardian.students.through._meta.db_table,
    ]
    with connection.cursor() as cur:
        for table in tables:
            cur.execute(f'ANALYZE "{table}"')


def _write(*, school: School, parser: Parser) -> RosterResult:
    guardians, guardians_created = _write_guardians(school=school, entries=parser.guardians)
    existing = {
        s.external_id: s
        for s in Student.objects.filter(school=school, external_id__in=list(parser.students))
    }
    students_created = 0
    for entry in parser.students.values():
        student = existing.get(entry.external_id)
        if student is None:
            student = Student.objects.create(
                school=school,
                external_id=entry.external_id,
                first_name=entry.first_name,
                last_name=entry.last_name,
                year_level=entry.year_level,
            )
            students_created += 1
        else:
            _update(
                student,
                first_name=entry.first_name,
                last_name=entry.last_name,
                year_level=entry.year_level or student.year_level,
            )
        if entry.groups is not None:
            _set_roster_groups(student, entry.groups)
        if entry.guardian_keys:
            student.guardians.set([guardians[key] for key in entry.guardian_keys])
    return RosterResult(
        students=len(parser.students),
        guardians=len(guardians),
        students_created=students_created,
        guardians_created=guardians_created,
    )


def _write_guardians(
    *, school: School, entries: dict[tuple[str, ...], GuardianEntry]
) -> tuple[dict[tuple[str, ...], Guardian], int]:
    """Match every guardian of the file to a stored one, or create it.

    A stored guardian with the same address and name is the same person; otherwise a stored
    guardian with the same address is taken over (a renamed parent), oldest first, each stored
    row by at most one file guardian so two parents sharing a mailbox never merge.
    """
    emails = {e.email_normalized for e in entries.values() if e.email_normalized}
    stored_with_email = Guardian.objects.filter(school=school, email_normalized__in=emails)
    stored_without_email = Guardian.objects.filter(school=school, email_normalized="")
    candidates: dict[tuple[str, ...], list[Guardian]] = {}
    by_email: dict[str, list[Guardian]] = {}
    for g in [*stored_with_email.order_by("pk"), *stored_without_email.order_by("pk")]:
        candidates.setdefault(guardian_key(g.name, g.email_normalized, g.phone), []).append(g)
        if g.email_normalized:
            by_email.setdefault(g.email_normalized, []).append(g)

    claimed: set[int] = set()
    matched: dict[tuple[str, ...], Guardian] = {}

    def take(pool: Iterable[Guardian]) -> Guardian | None:
        for g in pool:
            if g.pk not in claimed:
                claimed.add(g.pk)
                return g
        return None

    for key in entries:
        found = take(candidates.get(key, []))
        if found is not None:
            matched[key] = found
    for key, entry in entries.items():
        if key not in matched and entry.email_normalized:
            found = take(by_email.get(entry.email_normalized, []))
            if found is not None:
                matched[key] = found

    created = 0
    result: dict[tuple[str, ...], Guardian] = {}
    for key, entry in entries.items():
        guardian = matched.get(key)
        if guardian is None:
            guardian = Guardian.objects.create(
                school=school,
                name=entry.name,
                email=entry.email,
                phone=entry.phone,
                receives_email=(
                    entry.receives_email if entry.receives_email is not None else bool(entry.email)
                ),
            )
            created += 1
        else:
            # A blank cell leaves the stored value: an export without phones, or without the
            # opt-out column, must not erase phones or re-subscribe parents who opted out.
            _update(
                guardian,
                name=entry.name,
                email=entry.email or guardian.email,
                phone=entry.phone or guardian.phone,
                receives_email=(
                    entry.receives_email
                    if entry.receives_email is not None
                    else guardian.receives_email
                ),
            )
        result[key] = guardian
    return result, created


def _update(obj: Student | Guardian, **values: object) -> None:
    changed = [name for name, value in values.items() if getattr(obj, name) != value]
    if changed:
        for name in changed:
            setattr(obj, name, values[name])
        if "email" in changed:
            changed.append("email_normalized")
        obj.save(update_fields=changed)


def _set_roster_groups(student: Student, groups: list[Group]) -> None:
    """Class and year-level memberships become exactly the listed ones; custom ones are added."""
    wanted = {g.pk for g in groups}
    stale = student.groups.filter(kind__in=ROSTER_GROUP_KINDS).exclude(pk__in=wanted)
    student.groups.remove(*stale)
    student.groups.add(*groups)
