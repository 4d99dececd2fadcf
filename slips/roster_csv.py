"""Reading and checking a roster CSV, the first half of the import in ``slips.roster``.

Split from ``slips.roster``, which writes: nothing here touches the database (the school's
groups are handed to the ``Parser``). The parser reads the whole file and collects every problem
with its line number instead of stopping at the first; what it accepts is one entry per student
and one per guardian, merged across the rows that repeat them. The columns and matching rules
are documented for schools in ``docs/roster-import.md``.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from typing import TextIO

from django.core.exceptions import ValidationError
from django.core.validators import validate_email

from slips.models import Group, Guardian, Student, normalize_email

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


@dataclass(frozen=True)
class RowError:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass
class StudentEntry:
    line: int
    external_id: str
    first_name: str
    last_name: str
    year_level: str = ""
    groups: list[Group] | None = None
    guardian_keys: list[tuple[str, ...]] = field(default_factory=list)


@dataclass
class GuardianEntry:
    line: int
    name: str
    email: str
    email_normalized: str
    phone: str = ""
    receives_email: bool | None = None


def _name_key(name: str) -> str:
    return " ".join(name.split()).casefold()


def guardian_key(name: str, email_normalized: str, phone: str) -> tuple[str, ...]:
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


class Parser:
    """Reads the whole file, collecting every problem instead of stopping at the first."""

    def __init__(self, *, groups_by_name: dict[str, Group]) -> None:
        self.groups_by_name = groups_by_name
        self.errors: list[RowError] = []
        self.students: dict[str, StudentEntry] = {}
        self.guardians: dict[tuple[str, ...], GuardianEntry] = {}
        self.rows = 0  # data rows read, blank lines not counted

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
                self.rows += 1
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
            StudentEntry(
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
        guardian = GuardianEntry(
            line=line,
            name=name,
            email=email,
            email_normalized=normalize_email(email) if email else "",
            phone=phone,
            receives_email=receives,
        )
        key = guardian_key(name, guardian.email_normalized, phone)
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

    def merge_student(self, entry: StudentEntry) -> StudentEntry | None:
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

    def merge_guardian(self, key: tuple[str, ...], entry: GuardianEntry) -> bool:
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
