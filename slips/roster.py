"""Roster import: one CSV of students and their guardians for one school.

The whole file is checked before anything is written, and every problem is reported with its
line number at once: a school fixing a spreadsheet wants the full list, not one error per try,
and a half-imported roster (some families updated, some not) is worse than none.

The columns and the matching rules are documented for schools in ``docs/roster-import.md``.
In short: one row per (student, guardian) pair; students are matched by external id, guardians
by normalized email (so siblings share one guardian); a blank cell never erases stored data.

Reading and checking the file is ``slips.roster_csv``, deciding what to write is
``slips.roster_plan`` (also the admin's preview, ``roster_preview``); this module is the public
entry and the writing of that plan. ``RowError`` is re-exported here, where callers import
the import's errors from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TextIO, TypeVar

from django.db import connection, transaction

from slips.models import Group, Guardian, School, Student, normalize_email
from slips.roster_csv import Parser, RowError
from slips.roster_plan import GroupLink, GuardianLink, RosterPlan, roster_plan

__all__ = [
    "RosterChangedError",
    "RosterError",
    "RosterPreview",
    "RosterResult",
    "RowError",
    "not_utf8_message",
    "roster_import",
    "roster_preview",
]

#: Called as ``progress(done, total)`` while the import writes (guardians, then students),
#: after each chunk of ``WRITE_CHUNK``.
Progress = Callable[[int, int], None]
_Person = TypeVar("_Person", Student, Guardian)
_T = TypeVar("_T")


class RosterError(Exception):
    """The file was not imported; ``errors`` says why, line by line."""

    def __init__(self, errors: list[RowError]) -> None:
        self.errors = sorted(errors, key=lambda e: e.line)
        super().__init__(str(self))

    def __str__(self) -> str:
        count = len(self.errors)
        head = f"{count} problem{'' if count == 1 else 's'} in the roster; nothing was imported."
        return "\n".join([head, *(str(e) for e in self.errors)])


class RosterChangedError(Exception):
    """The school's students or guardians changed since the preview: nothing was imported.

    ``plan`` is what the file would do now, to show staff before they confirm again.
    """

    def __init__(self, plan: RosterPlan) -> None:
        self.plan = plan
        super().__init__("the school's students or guardians changed since the preview")


@dataclass(frozen=True)
class RosterPreview:
    """What importing a file would do now: ``errors`` (then no ``plan``) or the ``plan``."""

    rows: int
    errors: list[RowError]
    plan: RosterPlan | None


def not_utf8_message(name: str, exc: UnicodeDecodeError) -> str:
    """The one wording of a file in another encoding, for the command and the admin."""
    return f"{name} is not UTF-8 text (byte {exc.start}); save it as 'CSV UTF-8'."


@dataclass(frozen=True)
class RosterResult:
    students: int
    guardians: int
    students_created: int
    guardians_created: int

    def __str__(self) -> str:
        return f"Imported {self.students} students, {self.guardians} guardians"


def roster_preview(*, school: School, file: TextIO) -> RosterPreview:
    """What importing ``file`` would do to the school now. Reads only."""
    parser = _parse(school=school, file=file)
    if parser.errors:
        return RosterPreview(parser.rows, sorted(parser.errors, key=lambda e: e.line), None)
    return RosterPreview(parser.rows, [], roster_plan(school=school, parser=parser))


def roster_import(
    *,
    school: School,
    file: TextIO,
    expected: str | None = None,
    progress: Progress | None = None,
) -> RosterResult:
    """Import a roster CSV for one school, all of it or nothing.

    Raises ``RosterError`` listing every bad row. The school row is locked for the duration so
    two imports for one school run one after the other instead of both creating the same
    guardians (guardian addresses are not unique in the database: families share mailboxes).
    With ``expected`` (a preview's fingerprint), raises ``RosterChangedError`` instead of
    importing anything other than what that preview showed.
    """
    with transaction.atomic():
        School.objects.select_for_update().filter(pk=school.pk).exists()
        parser = _parse(school=school, file=file)
        if parser.errors:
            raise RosterError(parser.errors)
        plan = roster_plan(school=school, parser=parser)
        if expected is not None and plan.fingerprint() != expected:
            raise RosterChangedError(plan)
        result = _write(school=school, plan=plan, progress=progress)
    if result.students_created + result.guardians_created >= ANALYZE_AFTER_ROWS:
        _refresh_planner_statistics()
    return result


def _parse(*, school: School, file: TextIO) -> Parser:
    groups = {g.name.casefold(): g for g in Group.objects.filter(school=school)}
    parser = Parser(groups_by_name=groups)
    parser.parse(file)
    return parser


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


def _write(*, school: School, plan: RosterPlan, progress: Progress | None) -> RosterResult:
    """Writes the plan, nothing more: every decision was taken in ``roster_plan``.

    New rows and new links go in with one INSERT per chunk: row by row, 20,000 new students
    took minutes. Changes and removals (few, in a school's routine re-import) go row by row.
    """
    total = len(plan.guardians) + len(plan.students)
    done = 0

    def advance(count: int) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress(done, total)

    guardians: dict[tuple[str, ...], Guardian] = {}
    guardians_created = 0
    for chunk in _chunks(plan.guardians):
        new = {g.key: Guardian(school=school, **g.values) for g in chunk if g.stored is None}
        for guardian in new.values():
            # bulk_create does not call save(), which normally sets it.
            guardian.email_normalized = normalize_email(guardian.email) if guardian.email else ""
        Guardian.objects.bulk_create(new.values())
        guardians.update(new)
        guardians_created += len(new)
        for g in chunk:
            if g.stored is not None:
                guardians[g.key] = _update(g.stored, g.changes)
        advance(len(chunk))

    students_created = 0
    for chunk in _chunks(plan.students):
        new = {
            id(s): Student(school=school, external_id=s.entry.external_id, **s.values)
            for s in chunk
            if s.stored is None
        }
        Student.objects.bulk_create(new.values())
        students_created += len(new)
        group_links, guardian_links = [], []
        for s in chunk:
            student = new[id(s)] if s.stored is None else _update(s.stored, s.changes)
            if s.groups_removed:
                student.groups.remove(*s.groups_removed)
            if s.guardians_removed:
                student.guardians.remove(*s.guardians_removed)
            group_links += [GroupLink(group=g, student=student) for g in s.groups_added]
            guardian_links += [
                GuardianLink(guardian=guardians[key], student=student) for key in s.guardians_added
            ]
        # ignore_conflicts: a link someone added by hand since the plan is already there.
        GroupLink.objects.bulk_create(group_links, ignore_conflicts=True)
        GuardianLink.objects.bulk_create(guardian_links, ignore_conflicts=True)
        advance(len(chunk))
    return RosterResult(
        students=len(plan.students),
        guardians=len(plan.guardians),
        students_created=students_created,
        guardians_created=guardians_created,
    )


WRITE_CHUNK = 500


def _chunks(items: list[_T]) -> Iterator[list[_T]]:
    for start in range(0, len(items), WRITE_CHUNK):
        yield items[start : start + WRITE_CHUNK]


def _update(obj: _Person, changes: dict[str, tuple[object, object]]) -> _Person:
    if changes:
        fields = list(changes)
        for name, (_old, new) in changes.items():
            setattr(obj, name, new)
        if "email" in fields:
            fields.append("email_normalized")
        obj.save(update_fields=fields)
    return obj
