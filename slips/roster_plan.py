"""What a roster import will do to one school, worked out before anything is written.

Staff see this plan as the preview, and ``slips.roster`` then writes exactly this plan: both
come from ``roster_plan``, so the matching of guardians, the "a blank cell never erases" rule
and the group and guardian links are decided once, in one place, and the preview cannot
promise something the write does differently. Reading only: nothing here writes.

The plan's ``fingerprint`` covers every decision (which stored row each entry became, every
change). The import recomputes the plan under the school's lock and compares fingerprints, so
a confirmed preview is imported as shown or not at all (the school changed meanwhile).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from slips.models import Group, Guardian, School, Student
from slips.roster_csv import GuardianEntry, Parser, StudentEntry, guardian_key

# Groups whose membership the roster owns. Custom groups are built by staff in the admin, so an
# import only ever adds students to them.
ROSTER_GROUP_KINDS = (Group.Kind.CLASS, Group.Kind.YEAR)

Key = tuple[str, ...]
GroupLink = Group.students.through
GuardianLink = Guardian.students.through


@dataclass
class GuardianPlan:
    key: Key
    entry: GuardianEntry
    stored: Guardian | None  # None: a new guardian
    values: dict[str, Any]  # what the guardian's fields will be
    changes: dict[str, tuple[Any, Any]]  # field: (old, new), for a stored guardian


@dataclass
class StudentPlan:
    entry: StudentEntry
    stored: Student | None  # None: a new student
    values: dict[str, Any]
    changes: dict[str, tuple[Any, Any]]
    groups_added: list[Group] = field(default_factory=list)
    groups_removed: list[Group] = field(default_factory=list)
    guardians_added: list[Key] = field(default_factory=list)  # file guardians newly linked
    guardians_removed: list[Guardian] = field(default_factory=list)  # stored links dropped

    @property
    def touched(self) -> bool:
        return bool(
            self.stored is None
            or self.changes
            or self.groups_added
            or self.groups_removed
            or self.guardians_added
            or self.guardians_removed
        )


@dataclass
class RosterPlan:
    guardians: list[GuardianPlan]
    students: list[StudentPlan]
    # The school's students not in the file: an import never deletes them.
    untouched_students: int

    @property
    def guardian_names(self) -> dict[Key, str]:
        return {g.key: g.entry.name for g in self.guardians}

    def fingerprint(self) -> str:
        """A digest of every decision, stored pks included (see the module docstring)."""
        decisions = {
            "guardians": [
                [list(g.key), g.stored.pk if g.stored else None, _jsonable(g.changes)]
                for g in self.guardians
            ],
            "students": [
                [
                    s.entry.external_id,
                    s.stored.pk if s.stored else None,
                    _jsonable(s.changes),
                    sorted(g.pk for g in s.groups_added),
                    sorted(g.pk for g in s.groups_removed),
                    sorted(list(k) for k in s.guardians_added),
                    sorted(g.pk for g in s.guardians_removed),
                ]
                for s in self.students
            ],
            "untouched": self.untouched_students,
        }
        encoded = json.dumps(decisions, sort_keys=True, default=str).encode()
        return hashlib.sha256(encoded).hexdigest()

    def summary(self, *, limit: int) -> dict[str, Any]:
        """The preview as JSON: counts of everything, and at most ``limit`` rows per table."""
        names = self.guardian_names
        added = [s for s in self.students if s.stored is None]
        changed = [s for s in self.students if s.stored is not None and s.touched]
        removals = [
            {"external_id": s.entry.external_id, "student": _name(s), "kind": kind, "name": name}
            for s in self.students
            for kind, name in [
                *(("guardian", str(g)) for g in s.guardians_removed),
                *(("group", g.name) for g in s.groups_removed),
            ]
        ]
        g_added = [g for g in self.guardians if g.stored is None]
        g_changed = [g for g in self.guardians if g.stored is not None and g.changes]
        return {
            "fingerprint": self.fingerprint(),
            "counts": {
                "students": len(self.students),
                "guardians": len(self.guardians),
                "students_added": len(added),
                "students_changed": len(changed),
                "students_unchanged": len(self.students) - len(added) - len(changed),
                "students_untouched": self.untouched_students,
                "guardians_added": len(g_added),
                "guardians_changed": len(g_changed),
                "removals": len(removals),
            },
            "students_added": [
                {
                    "external_id": s.entry.external_id,
                    "name": _name(s),
                    "year_level": s.values["year_level"],
                    "groups": [g.name for g in s.groups_added],
                    "guardians": [names[k] for k in s.guardians_added],
                }
                for s in added[:limit]
            ],
            "students_changed": [
                {
                    "external_id": s.entry.external_id,
                    "name": _name(s),
                    "changes": _change_rows(s.changes),
                    "groups_added": [g.name for g in s.groups_added],
                    "guardians_added": [names[k] for k in s.guardians_added],
                }
                for s in changed[:limit]
            ],
            "guardians_added": [_guardian_row(g.values) for g in g_added[:limit]],
            "guardians_changed": [
                {**_guardian_row(g.values), "changes": _change_rows(g.changes)}
                for g in g_changed[:limit]
            ],
            "removals": removals[:limit],
        }


def roster_plan(*, school: School, parser: Parser) -> RosterPlan:
    """The plan for a file the parser accepted (no errors) against the school as it is now.

    Links are read from the two link tables as pairs of ids, not through Django's prefetching:
    for a school of 20,000 students building their related managers took most of the time.
    """
    matched = match_guardians(school=school, entries=parser.guardians)
    guardians = []
    for key, entry in parser.guardians.items():
        stored = matched.get(key)
        values = guardian_values(entry, stored)
        guardians.append(GuardianPlan(key, entry, stored, values, _changes(stored, values)))
    matched_pks = {key: g.pk for key, g in matched.items()}

    everyone = Student.objects.filter(school=school).exclude(external_id="")
    stored_students = {s.external_id: s for s in everyone if s.external_id in parser.students}
    untouched = Student.objects.filter(school=school).count() - len(stored_students)
    group_links: dict[int, list[int]] = defaultdict(list)
    for student_id, group_id in (
        GroupLink.objects.filter(student__school=school)
        .order_by("group_id")
        .values_list("student_id", "group_id")
    ):
        group_links[student_id].append(group_id)
    guardian_links: dict[int, set[int]] = defaultdict(set)
    for student_id, guardian_id in GuardianLink.objects.filter(student__school=school).values_list(
        "student_id", "guardian_id"
    ):
        guardian_links[student_id].add(guardian_id)
    linked_groups = {g for ids in group_links.values() for g in ids}
    groups = Group.objects.in_bulk(linked_groups)

    students, dropped_ids = [], []
    for entry in parser.students.values():
        stored = stored_students.get(entry.external_id)
        pk = stored.pk if stored else None
        current_groups = [groups[g] for g in group_links.get(pk, [])]
        plan, dropped = _student_plan(
            entry, stored, current_groups, guardian_links.get(pk, set()), matched_pks
        )
        students.append(plan)
        dropped_ids.append(dropped)
    # The guardians whose links go away, as rows (the preview names them), in one query.
    rows = Guardian.objects.in_bulk({pk for ids in dropped_ids for pk in ids})
    for plan, ids in zip(students, dropped_ids, strict=True):
        plan.guardians_removed = [rows[pk] for pk in ids]
    return RosterPlan(guardians, students, untouched_students=untouched)


def match_guardians(*, school: School, entries: dict[Key, GuardianEntry]) -> dict[Key, Guardian]:
    """Which stored guardian each guardian of the file is (a key missing: a new guardian).

    A stored guardian with the same address and name is the same person; otherwise a stored
    guardian with the same address is taken over (a renamed parent), oldest first, each stored
    row by at most one file guardian so two parents sharing a mailbox never merge.
    """
    emails = {e.email_normalized for e in entries.values() if e.email_normalized}
    stored_with_email = Guardian.objects.filter(school=school, email_normalized__in=emails)
    stored_without_email = Guardian.objects.filter(school=school, email_normalized="")
    candidates: dict[Key, list[Guardian]] = {}
    by_email: dict[str, list[Guardian]] = {}
    for g in [*stored_with_email.order_by("pk"), *stored_without_email.order_by("pk")]:
        candidates.setdefault(guardian_key(g.name, g.email_normalized, g.phone), []).append(g)
        if g.email_normalized:
            by_email.setdefault(g.email_normalized, []).append(g)

    claimed: set[int] = set()
    matched: dict[Key, Guardian] = {}

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
    return matched


def guardian_values(entry: GuardianEntry, stored: Guardian | None) -> dict[str, Any]:
    """The guardian's fields after the import.

    A blank cell leaves the stored value: an export without phones, or without the opt-out
    column, must not erase phones or re-subscribe parents who opted out.
    """
    if stored is None:
        receives = entry.receives_email if entry.receives_email is not None else bool(entry.email)
        return {
            "name": entry.name,
            "email": entry.email,
            "phone": entry.phone,
            "receives_email": receives,
        }
    return {
        "name": entry.name,
        "email": entry.email or stored.email,
        "phone": entry.phone or stored.phone,
        "receives_email": (
            entry.receives_email if entry.receives_email is not None else stored.receives_email
        ),
    }


def _student_plan(
    entry: StudentEntry,
    stored: Student | None,
    current_groups: list[Group],
    current_guardians: set[int],
    matched_pks: dict[Key, int],
) -> tuple[StudentPlan, list[int]]:
    """The student's plan, and the ids of the guardians it loses (``roster_plan`` loads them)."""
    values = {
        "first_name": entry.first_name,
        "last_name": entry.last_name,
        "year_level": entry.year_level or (stored.year_level if stored else ""),
    }
    plan = StudentPlan(entry, stored, values, _changes(stored, values))
    dropped: list[int] = []
    if entry.groups is not None:
        # Class and year-level memberships become exactly the listed ones; custom ones are added.
        wanted = {g.pk for g in entry.groups}
        have = {g.pk for g in current_groups}
        plan.groups_removed = [
            g for g in current_groups if g.kind in ROSTER_GROUP_KINDS and g.pk not in wanted
        ]
        plan.groups_added = [g for g in entry.groups if g.pk not in have]
    if entry.guardian_keys:
        # A student's guardians become exactly those on its rows (none listed: left alone).
        wanted_pks = {matched_pks.get(k) for k in entry.guardian_keys} - {None}
        dropped = sorted(current_guardians - wanted_pks)
        plan.guardians_added = [
            k
            for k in entry.guardian_keys
            if k not in matched_pks or matched_pks[k] not in current_guardians
        ]
    return plan, dropped


def _changes(stored: Student | Guardian | None, values: dict[str, Any]) -> dict:
    if stored is None:
        return {}
    return {
        name: (getattr(stored, name), value)
        for name, value in values.items()
        if getattr(stored, name) != value
    }


def _jsonable(changes: dict[str, tuple[Any, Any]]) -> list:
    return sorted([name, old, new] for name, (old, new) in changes.items())


def _change_rows(changes: dict[str, tuple[Any, Any]]) -> list[dict[str, Any]]:
    return [
        {"field": name, "old": _shown(old), "new": _shown(new)}
        for name, (old, new) in changes.items()
    ]


def _shown(value: Any) -> Any:
    # receives_email: "no" on the page, where a False would read as a blank.
    return ("yes" if value else "no") if isinstance(value, bool) else value


def _name(plan: StudentPlan) -> str:
    return f"{plan.values['first_name']} {plan.values['last_name']}"


def _guardian_row(values: dict[str, Any]) -> dict[str, Any]:
    return {name: values[name] for name in ("name", "email", "phone", "receives_email")}
