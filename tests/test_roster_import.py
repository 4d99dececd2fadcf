"""Roster import: all-or-nothing, every bad row by line number, re-import without duplicates."""

from __future__ import annotations

import io

import pytest
from django.core.management import CommandError, call_command

from slips.audiences import audience_recipients
from slips.models import Group, Guardian, Student
from slips.roster import RosterError, RowError, roster_import
from tests import factories

HEADER = (
    "student_external_id,student_first_name,student_last_name,year_level,groups,"
    "guardian_name,guardian_email,guardian_phone,guardian_receives_email"
)
EXAMPLE = "\n".join(
    [
        HEADER,
        "S1001,Olivia,Nguyen,3,Year 3;3A,Sarah Nguyen,sarah.nguyen@example.org,0400 000 001,yes",
        "S1001,Olivia,Nguyen,3,Year 3;3A,David Nguyen,david.nguyen@example.org,0400 000 002,no",
        "S1002,Noah,Nguyen,5,Year 5;5B,Sarah Nguyen,Sarah.Nguyen@Example.org,0400 000 001,yes",
        "S1003,Amelia,Smith,3,Year 3;3B,Priya Smith,,0400 000 003,",
    ]
)


@pytest.fixture
def groups(school):
    return factories.make_roster_groups(school=school)


def run(school, text: str):
    return roster_import(school=school, file=io.StringIO(text))


def errors_of(school, text: str) -> list[tuple[int, str]]:
    with pytest.raises(RosterError) as info:
        run(school, text)
    return [(e.line, e.reason) for e in info.value.errors]


def snapshot(school) -> tuple:
    """Everything an import can write, to compare before and after a refused import."""
    return (
        sorted(Student.objects.filter(school=school).values_list()),
        sorted(Guardian.objects.filter(school=school).values_list()),
        sorted(
            Guardian.students.through.objects.filter(guardian__school=school).values_list(
                "guardian_id", "student_id"
            )
        ),
        sorted(
            Group.students.through.objects.filter(group__school=school).values_list(
                "group_id", "student_id"
            )
        ),
    )


@pytest.mark.django_db
def test_happy_path_creates_students_guardians_links_and_groups(school, groups):
    result = run(school, EXAMPLE)

    assert (result.students, result.guardians) == (3, 3)
    assert (result.students_created, result.guardians_created) == (3, 3)
    assert str(result) == "Imported 3 students, 3 guardians"
    olivia = Student.objects.get(school=school, external_id="S1001")
    noah = Student.objects.get(school=school, external_id="S1002")
    amelia = Student.objects.get(school=school, external_id="S1003")
    assert (olivia.first_name, olivia.last_name, olivia.year_level) == ("Olivia", "Nguyen", "3")
    assert {g.name for g in olivia.groups.all()} == {"Year 3", "3A"}
    assert {g.name for g in noah.groups.all()} == {"Year 5", "5B"}
    assert {g.name for g in olivia.guardians.all()} == {"Sarah Nguyen", "David Nguyen"}
    david = Guardian.objects.get(school=school, name="David Nguyen")
    assert david.receives_email is False
    assert david.phone == "0400 000 002"
    priya = Guardian.objects.get(school=school, name="Priya Smith")
    assert (priya.email, priya.receives_email) == ("", False)
    assert list(amelia.guardians.all()) == [priya]


@pytest.mark.django_db
def test_siblings_share_one_guardian_matched_by_normalized_email(school, groups):
    run(school, EXAMPLE)

    sarah = Guardian.objects.get(school=school, email_normalized="sarah.nguyen@example.org")
    assert {s.external_id for s in sarah.students.all()} == {"S1001", "S1002"}
    assert Guardian.objects.filter(school=school).count() == 3


@pytest.mark.django_db
def test_every_kind_of_bad_row_is_reported_with_its_line_and_nothing_is_written(school, groups):
    text = "\n".join(
        [
            HEADER,  # line 1
            "S1,Ann,Lee,3,3A,Pat Lee,not-an-email,,",  # 2: invalid email
            "S2,,Lee,3,3A,Pat Lee,pat@example.org,,",  # 3: missing first name
            "S3,Bo,,3,3A,Pat Lee,pat@example.org,,",  # 4: missing last name
            ",Cy,Lee,3,3A,Pat Lee,pat@example.org,,",  # 5: missing external id
            "S5,Di,Lee,3,3A;Band;Chess,Pat Lee,pat@example.org,,",  # 6: two unknown groups
            "S6,Ed,Lee,3,3A,Pat Lee,pat@example.org,,maybe",  # 7: bad boolean
            "S7,Fay,Lee,3,3A,,pat@example.org,,",  # 8: guardian without a name
            "S8,Gus,Lee,3,3A,Kim Lee,,,yes",  # 9: wants email, has none
            "S9,Hal,Lee,3,3A,Pat Lee",  # 10: too few fields
            "S10,Ivy,Lee,3,3A,Pat Lee,pat@example.org,,,extra",  # 11: too many fields
            "S11," + "x" * 101 + ",Lee,3,3A,Pat Lee,pat@example.org,,",  # 12: too long
            "S12,Jo,Lee,3,3A,Pat Lee,pat@example.org,,",  # 13: fine
            "S12,Joe,Lee,3,3A,Sam Lee,sam@example.org,,",  # 14: same student, other name
        ]
    )
    before = snapshot(school)

    errors = errors_of(school, text)

    assert errors == [
        (2, "invalid guardian email 'not-an-email'"),
        (3, "missing student first name"),
        (4, "missing student last name"),
        (5, "missing student_external_id"),
        (6, "unknown group 'Band' (groups must exist before the import)"),
        (6, "unknown group 'Chess' (groups must exist before the import)"),
        (7, "guardian_receives_email must be yes or no, not 'maybe'"),
        (8, "missing guardian name"),
        (9, "guardian_receives_email is yes but guardian_email is blank"),
        (10, "has 6 fields but the header has 9"),
        (11, "has 10 fields but the header has 9"),
        (12, "student_first_name is longer than 100 characters"),
        (14, "student 'S12' is also on line 13 with a different name"),
    ]
    assert snapshot(school) == before
    assert not Student.objects.filter(school=school).exists()


@pytest.mark.django_db
def test_header_problems_are_reported_on_line_one(school, groups):
    text = "student_external_id,student_first_name,Student_First_Name,guardian_emial\nS1,A,A,x\n"

    errors = errors_of(school, text)

    assert errors == [
        (1, "column 'student_first_name' appears twice"),
        (
            1,
            "unknown column 'guardian_emial' (known: student_external_id, student_first_name, "
            "student_last_name, guardian_name, guardian_email, year_level, groups, "
            "guardian_phone, guardian_receives_email)",
        ),
        (1, "missing required column 'student_last_name'"),
        (1, "missing required column 'guardian_name'"),
        (1, "missing required column 'guardian_email'"),
    ]


@pytest.mark.django_db
def test_empty_file_and_header_only_file_are_errors(school):
    assert errors_of(school, "") == [(1, "the file is empty; the first line must name the columns")]
    assert errors_of(school, HEADER + "\n\n") == [(2, "the file has a header but no students")]


@pytest.mark.django_db
def test_one_bad_row_leaves_existing_data_untouched(school, groups):
    run(school, EXAMPLE)
    before = snapshot(school)
    changed = EXAMPLE.replace("Olivia,Nguyen,3", "Olive,Nguyen,4") + "\nS9,Zed,Ray,3,3A,Zoe,bad@,,"

    assert errors_of(school, changed) == [(6, "invalid guardian email 'bad@'")]
    assert snapshot(school) == before


@pytest.mark.django_db
def test_reimport_of_the_same_file_changes_nothing(school, groups):
    run(school, EXAMPLE)
    before = snapshot(school)

    again = run(school, EXAMPLE)

    assert (again.students_created, again.guardians_created) == (0, 0)
    assert snapshot(school) == before


@pytest.mark.django_db
def test_reimport_updates_in_place_without_duplicating(school, groups):
    run(school, EXAMPLE)
    olivia = Student.objects.get(school=school, external_id="S1001")
    olivia.groups.add(groups["Choir"])  # made by staff in the admin
    sarah_id = Guardian.objects.get(school=school, name="Sarah Nguyen").pk
    changed = "\n".join(
        [
            HEADER,
            # Olivia moves to 3B and renamed; David's row is gone; Sarah renamed (same address).
            "S1001,Olivia,Tran,3,Year 3;3B,Sarah Tran,sarah.nguyen@example.org,0400 000 009,",
            "S1002,Noah,Nguyen,5,Year 5;5B,Sarah Tran,sarah.nguyen@example.org,,",
            "S1003,Amelia,Smith,3,Year 3;3B,Priya Smith,,0400 000 003,",
        ]
    )

    result = run(school, changed)

    assert (result.students_created, result.guardians_created) == (0, 0)
    assert Student.objects.filter(school=school).count() == 3
    assert Guardian.objects.filter(school=school).count() == 3
    olivia.refresh_from_db()
    assert olivia.last_name == "Tran"
    assert {g.name for g in olivia.groups.all()} == {"Year 3", "3B", "Choir"}
    sarah = Guardian.objects.get(pk=sarah_id)
    assert (sarah.name, sarah.phone) == ("Sarah Tran", "0400 000 009")
    assert list(olivia.guardians.all()) == [sarah]
    assert Guardian.objects.filter(school=school, name="David Nguyen").exists()


@pytest.mark.django_db
def test_blank_cells_keep_stored_values_so_an_opt_out_survives(school, groups):
    run(school, EXAMPLE)
    Guardian.objects.filter(name="Sarah Nguyen").update(receives_email=False)
    without_optional = "\n".join(
        [
            "student_external_id,student_first_name,student_last_name,guardian_name,guardian_email",
            "S1001,Olivia,Nguyen,Sarah Nguyen,sarah.nguyen@example.org",
        ]
    )

    run(school, without_optional)

    sarah = Guardian.objects.get(school=school, name="Sarah Nguyen")
    assert (sarah.receives_email, sarah.phone) == (False, "0400 000 001")
    olivia = Student.objects.get(school=school, external_id="S1001")
    assert olivia.year_level == "3"
    assert {g.name for g in olivia.groups.all()} == {"Year 3", "3A"}


@pytest.mark.django_db
def test_two_parents_sharing_a_mailbox_stay_two_guardians_but_one_recipient(school, groups):
    text = "\n".join(
        [
            HEADER,
            "S1,Ann,Lee,3,3A,Pat Lee,family.lee@example.org,,",
            "S1,Ann,Lee,3,3A,Sam Lee,Family.Lee@example.org,,",
        ]
    )

    run(school, text)
    run(school, text)

    assert Guardian.objects.filter(school=school).count() == 2
    recipients = audience_recipients(factories.make_audience(school=school))
    assert [r.email_normalized for r in recipients] == ["family.lee@example.org"]


@pytest.mark.django_db
def test_bom_crlf_quoted_cells_and_trailing_blank_lines(school, groups):
    text = (
        "\ufeff"
        + HEADER
        + '\r\nS1,Ann,"Lee, Jr",3,"Year 3; 3a",Pat Lee,pat@example.org,,Y\r\n\r\n,,,,,,,,\r\n\r\n'
    )

    result = run(school, text)

    assert result.students == 1
    ann = Student.objects.get(school=school, external_id="S1")
    assert ann.last_name == "Lee, Jr"
    assert {g.name for g in ann.groups.all()} == {"Year 3", "3A"}


@pytest.mark.django_db
def test_import_is_confined_to_its_school(school, other_school, groups):
    theirs = factories.make_student(school=other_school, external_id="S1001", first_name="Other")
    their_sarah = factories.make_guardian(
        school=other_school, students=[theirs], email="sarah.nguyen@example.org"
    )

    run(school, EXAMPLE)

    theirs.refresh_from_db()
    assert theirs.first_name == "Other"
    assert list(their_sarah.students.all()) == [theirs]
    assert Guardian.objects.filter(email_normalized="sarah.nguyen@example.org").count() == 2
    factories.make_group(school=other_school, name="Band")
    bad = HEADER + "\nS9,Zed,Ray,3,Band,Zoe,zoe@example.org,,"
    assert errors_of(school, bad) == [
        (2, "unknown group 'Band' (groups must exist before the import)")
    ]


def test_roster_error_reads_as_a_list():
    error = RosterError([RowError(4, "missing guardian name"), RowError(2, "bad")])
    assert str(error) == (
        "2 problems in the roster; nothing was imported.\n"
        "line 2: bad\n"
        "line 4: missing guardian name"
    )


@pytest.mark.django_db
def test_import_roster_command_prints_counts(school, groups, tmp_path):
    path = tmp_path / "roster.csv"
    path.write_text(EXAMPLE, encoding="utf-8-sig")
    out = io.StringIO()

    call_command("import_roster", "--school", school.slug, str(path), stdout=out)

    assert out.getvalue().splitlines()[0] == "Imported 3 students, 3 guardians"
    assert Student.objects.filter(school=school).count() == 3


@pytest.mark.django_db
def test_import_roster_command_lists_errors_and_fails(school, groups, tmp_path):
    path = tmp_path / "roster.csv"
    path.write_text(HEADER + "\nS1,,Lee,3,3A,Pat,pat@,,\nS2,Bo,Lee,3,Nope,Pat,pat@x.org,,\n")

    with pytest.raises(CommandError) as info:
        call_command("import_roster", "--school", school.slug, str(path), stdout=io.StringIO())

    assert str(info.value).splitlines()[1:] == [
        "line 2: missing student first name",
        "line 2: invalid guardian email 'pat@'",
        "line 3: unknown group 'Nope' (groups must exist before the import)",
    ]
    assert not Student.objects.filter(school=school).exists()


@pytest.mark.django_db
def test_import_roster_command_rejects_unknown_school_missing_file_and_non_utf8(school, tmp_path):
    path = tmp_path / "roster.csv"
    path.write_bytes((HEADER + "\nS1,Zo\xeb,Lee,,,,,,\n").encode("latin-1"))

    with pytest.raises(CommandError, match="No school with slug 'nowhere'"):
        call_command("import_roster", "--school", "nowhere", str(path))
    with pytest.raises(CommandError, match="Cannot read"):
        call_command("import_roster", "--school", school.slug, str(tmp_path / "missing.csv"))
    with pytest.raises(CommandError, match="is not UTF-8"):
        call_command("import_roster", "--school", school.slug, str(path))
    assert not Student.objects.exists()


@pytest.mark.django_db
def test_repeat_rows_may_leave_cells_blank_but_must_not_contradict(school, groups):
    consistent = "\n".join(
        [
            HEADER,
            "S1,Ann,Lee,3,Year 3;3A,Pat Lee,pat@example.org,0400 1,yes",
            "S1,Ann,Lee,,,Sam Lee,sam@example.org,,",
            "S2,Bo,Lee,5,Year 5,Pat Lee,PAT@example.org,,",
        ]
    )
    run(school, consistent)
    assert Student.objects.get(school=school, external_id="S1").year_level == "3"
    assert Guardian.objects.get(school=school, name="Pat Lee").students.count() == 2

    contradicting = "\n".join(
        [
            HEADER,
            "S1,Ann,Lee,3,Year 3;3A,Pat Lee,pat@example.org,0400 1,yes",
            "S1,Ann,Lee,4,,Sam Lee,sam@example.org,,",
            "S1,Ann,Lee,,3A,Kim Lee,kim@example.org,,",
            "S2,Bo,Lee,5,Year 5,Pat Lee,pat@example.org,0400 2,no",
        ]
    )
    assert errors_of(school, contradicting) == [
        (3, "student 'S1' is also on line 2 with a different year_level"),
        (4, "student 'S1' is also on line 2 with different groups"),
        (5, "guardian 'Pat Lee' is also on line 2 with a different phone"),
        (5, "guardian 'Pat Lee' is also on line 2 with a different guardian_receives_email"),
    ]
