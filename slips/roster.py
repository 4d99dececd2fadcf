"""Roster import: one CSV of students and their guardians for one school.

The whole file is checked before anything is written, and every problem is reported with its
line number at once: a school fixing a spreadsheet wants the full list, not one error per try,
and a half-imported roster (some families updated, some not) is worse than none.

The columns and the matching rules are documented for schools in ``docs/roster-import.md``.
In short: one row per (student, guardian) pair; students are matched by external id, guardians
by normalized email (so siblings share one guardian); a blank cell never erases stored data.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TextIO

from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import connection, transaction

from slips.models import Group, Guardian, School, Student, normalize_email

REQUIRED_COLUMNS = (
    "student_external_id",
    "student_first_name",
    "student_last_name",
    "guardian_name",
    "guardian_email",
)
OPTIONAL_COLUMNS = ("year_level", "groups", "guardian_phone", "guardian_receives_email")
COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS

TRUE_WORDS = frozenset({"yes", "y", "true", "t", "1"})
FALSE_WORDS = frozenset({"no", "n", "false", "f", "0"})

# Lengths of the model fields; checked here so that a long cell is a row error, not a
# database error halfway through the write.
MAX_LENGTHS = {
    "student_external_id": Student._meta.get_field("external_id").max_length,
    "student_first_name": Student._meta.get_field("first_name").max_length,
    "student_last_name": Student._meta.get_field("last_name").max_length,
    "year_level": Student._meta.get_field("year_level").max_length,
    "guardian_name": Guardian._meta.get_field("name").max_length,
    "guardian_email": Guardian._meta.get_field("email").max_length,
    "guardian_phone": Guardian._meta.get_field("phone").max_length,
}

# Groups whose membership the roster owns. Custom groups are built by staff in the admin, so an
# import only ever adds students to them.
ROSTER_GROUP_KINDS = (Group.Kind.CLASS, Group.Kind.YEAR)


@dataclass(frozen=True)
class RowError:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


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


@dataclass
class _StudentEntry:
    line: int
    external_id: str
    first_name: str
    last_name: str
    year_level: str = ""
    groups: list[Group] | None = None
    guardian_keys: list[tuple[str, ...]] = field(default_factory=list)


@dataclass
class _GuardianEntry:
    line: int
    name: str
    email: str
    email_normalized: str
    phone: str = ""
    receives_email: bool | None = None


def _name_key(name: str) -> str:
    return " ".join(name.split()).casefold()


def _guardian_key(name: str, email_normalized: str, phone: str) -> tuple[str, ...]:
    """Who a guardian is within one file.

    With an address: the address and the name, so siblings' rows name one guardian while two
    parents who share a family mailbox stay two people (recipient resolution then sends that
    mailbox one email). Without an address: the name and the phone digits.
    """
    if email_normalized:
        return ("email", email_normalized, _name_key(name))
    return ("phone", _name_key(name), re.sub(r"\D", "", phone))


def _parse_bool(raw: str) -> bool | None:
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(raw)


class _Parser:
    """Reads the whole file, collecting every problem instead of stopping at the first."""

    def __init__(self, *, groups_by_name: dict[str, Group]) -> None:
        self.groups_by_name = groups_by_name
        self.errors: list[RowError] = []
        self.students: dict[str, _StudentEntry] = {}
        self.guardians: dict[tuple[str, ...], _GuardianEntry] = {}

    def error(self, line: int, reason: str) -> None:
        self.errors.append(RowError(line, reason))

    def parse(self, file: TextIO) -> None:
        reader = csv.reader(file)
        header: list[str] | None = None
        header_line = 0
        try:
            while True:
                line = reader.line_num + 1
                try:
                    cells = next(reader)
                except StopIteration:
                    break
                if not any(cell.strip() for cell in cells):
                    continue
                if header is None:
                    header_line = line
                    header = self.parse_header(cells, line)
                    if header is None:
                        return
                    continue
                self.parse_row(header, cells, line)
        except csv.Error as exc:
            self.error(reader.line_num, f"the file is not valid CSV ({exc})")
            return
        if header is None:
            self.error(1, "the file is empty; the first line must name the columns")
        elif not self.students and not self.errors:
            self.error(header_line + 1, "the file has a header but no students")

    def parse_header(self, cells: list[str], line: int) -> list[str] | None:
        names = [cell.strip().lower() for cell in cells]
        names[0] = names[0].lstrip("\ufeff")
        ok = True
        seen: set[str] = set()
        for name in names:
            if name in seen:
                self.error(line, f"column '{name}' appears twice")
                ok = False
            seen.add(name)
            if name not in COLUMNS:
                self.error(line, f"unknown column '{name}' (known: {', '.join(COLUMNS)})")
                ok = False
        for name in REQUIRED_COLUMNS:
            if name not in seen:
                self.error(line, f"missing required column '{name}'")
                ok = False
        return names if ok else None

    def parse_row(self, header: list[str], cells: list[str], line: int) -> None:
        if len(cells) != len(header):
            self.error(line, f"has {len(cells)} fields but the header has {len(header)}")
            return
        values = {name: cell.strip() for name, cell in zip(header, cells, strict=True)}
        before = len(self.errors)
        for column, limit in MAX_LENGTHS.items():
            if len(values.get(column, "")) > limit:
                self.error(line, f"{column} is longer than {limit} characters")

        external_id = values["student_external_id"]
        first_name = values["student_first_name"]
        last_name = values["student_last_name"]
        if not external_id:
            self.error(line, "missing student_external_id")
        if not first_name:
            self.error(line, "missing student first name")
        if not last_name:
            self.error(line, "missing student last name")
        groups = self.parse_groups(values.get("groups", ""), line)

        name = values["guardian_name"]
        email = values["guardian_email"]
        phone = values.get("guardian_phone", "")
        raw_receives = values.get("guardian_receives_email", "")
        receives: bool | None = None
        if raw_receives:
            try:
                receives = _parse_bool(raw_receives)
            except ValueError:
                self.error(line, f"guardian_receives_email must be yes or no, not '{raw_receives}'")
        if email:
            try:
                validate_email(email)
            except ValidationError:
                self.error(line, f"invalid guardian email '{email}'")
        if (email or phone or raw_receives) and not name:
            self.error(line, "missing guardian name")
        if receives is True and not email:
            self.error(line, "guardian_receives_email is yes but guardian_email is blank")
        if len(self.errors) > before:
            return

        student = self.merge_student(
            _StudentEntry(
                line=line,
                external_id=external_id,
                first_name=first_name,
                last_name=last_name,
                year_level=values.get("year_level", ""),
                groups=groups,
            )
        )
        if student is None or not name:
            return
        guardian = _GuardianEntry(
            line=line,
            name=name,
            email=email,
            email_normalized=normalize_email(email) if email else "",
            phone=phone,
            receives_email=receives,
        )
        key = _guardian_key(name, guardian.email_normalized, phone)
        if self.merge_guardian(key, guardian) and key not in student.guardian_keys:
            student.guardian_keys.append(key)

    def parse_groups(self, raw: str, line: int) -> list[Group] | None:
        names = [part.strip() for part in raw.split(";") if part.strip()]
        if not names:
            return None
        found: dict[int, Group] = {}
        for name in names:
            group = self.groups_by_name.get(name.casefold())
            if group is None:
                self.error(line, f"unknown group '{name}' (groups must exist before the import)")
            else:
                found[group.pk] = group
        return list(found.values())

    def merge_student(self, entry: _StudentEntry) -> _StudentEntry | None:
        """The student's entry, merging repeat rows (one per guardian) that must agree."""
        first = self.students.get(entry.external_id)
        if first is None:
            self.students[entry.external_id] = entry
            return entry
        where = f"student '{entry.external_id}' is also on line {first.line}"
        ok = True
        if (entry.first_name, entry.last_name) != (first.first_name, first.last_name):
            self.error(entry.line, f"{where} with a different name")
            ok = False
        if entry.year_level and first.year_level and entry.year_level != first.year_level:
            self.error(entry.line, f"{where} with a different year_level")
            ok = False
        if (
            entry.groups is not None
            and first.groups is not None
            and {g.pk for g in entry.groups} != {g.pk for g in first.groups}
        ):
            self.error(entry.line, f"{where} with different groups")
            ok = False
        if not ok:
            return None
        first.year_level = first.year_level or entry.year_level
        if first.groups is None:
            first.groups = entry.groups
        return first

    def merge_guardian(self, key: tuple[str, ...], entry: _GuardianEntry) -> bool:
        first = self.guardians.get(key)
        if first is None:
            self.guardians[key] = entry
            return True
        where = f"guardian '{entry.name}' is also on line {first.line}"
        ok = True
        if entry.phone and first.phone and entry.phone != first.phone:
            self.error(entry.line, f"{where} with a different phone")
            ok = False
        if (
            entry.receives_email is not None
            and first.receives_email is not None
            and entry.receives_email != first.receives_email
        ):
            self.error(entry.line, f"{where} with a different guardian_receives_email")
            ok = False
        if ok:
            first.phone = first.phone or entry.phone
            if first.receives_email is None:
                first.receives_email = entry.receives_email
        return ok


def roster_import(*, school: School, file: TextIO) -> RosterResult:
    """Import a roster CSV for one school, all of it or nothing.

    Raises ``RosterError`` listing every bad row. The school row is locked for the duration so
    two imports for one school run one after the other instead of both creating the same
    guardians (guardian addresses are not unique in the database: families share mailboxes).
    """
    with transaction.atomic():
        School.objects.select_for_update().filter(pk=school.pk).exists()
        groups = {g.name.casefold(): g for g in Group.objects.filter(school=school)}
        parser = _Parser(groups_by_name=groups)
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


def _write(*, school: School, parser: _Parser) -> RosterResult:
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
    *, school: School, entries: dict[tuple[str, ...], _GuardianEntry]
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
        candidates.setdefault(_guardian_key(g.name, g.email_normalized, g.phone), []).append(g)
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
