"""Roster import in the admin: upload, preview, confirm; the preview predicts the write.

Through Django's test client as staff of the school, against the real PostgreSQL and Redis.
The large-file path runs the real task function in-process (the way a worker would call it),
twice, to show a redelivered task imports nothing a second time.
"""

from __future__ import annotations

import datetime as dt
import io
import threading

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from slips import roster_imports, tasks
from slips.models import Guardian, Membership, RosterImport, Student
from slips.roster import roster_import, roster_preview
from tests import factories

# The same example roster as the command's tests.
from tests.test_roster_import import EXAMPLE, HEADER

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("web_settings")]

S = RosterImport.Status
ADD_URL = reverse("admin:slips_rosterimport_add")


@pytest.fixture
def groups(school):
    return factories.make_roster_groups(school=school)


def _client(school, role: str = Membership.Role.OFFICE) -> Client:
    client = Client()
    client.force_login(factories.make_staff(school=school, role=role))
    return client


def _upload(client: Client, school, text: str | bytes, name: str = "roster.csv"):
    data = text.encode() if isinstance(text, str) else text
    return client.post(
        ADD_URL, {"school": school.pk, "file": SimpleUploadedFile(name, data, "text/csv")}
    )


def _page(client: Client, row: RosterImport):
    return client.get(reverse("admin:slips_rosterimport_change", args=[row.pk]))


def _confirm(client: Client, row: RosterImport):
    return client.post(reverse("admin:slips_rosterimport_confirm", args=[row.pk]))


def _people(school) -> dict:
    """Every student, guardian and link of the school, keyed so that two states can be diffed."""
    students = {
        s.external_id: {
            "fields": (s.first_name, s.last_name, s.year_level),
            "groups": {g.name for g in s.groups.all()},
            "guardians": {g.pk for g in s.guardians.all()},
        }
        for s in Student.objects.filter(school=school).prefetch_related("groups", "guardians")
    }
    guardians = {
        g.pk: (g.name, g.email, g.phone, g.receives_email)
        for g in Guardian.objects.filter(school=school)
    }
    return {"students": students, "guardians": guardians}


# --- the page, through the client -----------------------------------------------------------


def test_the_students_list_links_to_the_import_for_office_staff_not_teachers(school):
    students = reverse("admin:slips_student_changelist")
    assert ADD_URL in _client(school).get(students).content.decode()
    teacher = _client(school, Membership.Role.TEACHER)
    assert ADD_URL not in teacher.get(students).content.decode()


def test_preview_shows_adds_changes_removals_and_untouched_then_confirm_imports(school, groups):
    olivia = factories.make_student(
        school=school, external_id="S1001", first_name="Olive", last_name="Nguyen", year_level="2"
    )
    groups["3B"].students.add(olivia)
    old_parent = factories.make_guardian(
        school=school, students=[olivia], name="Old Parent", email="old@example.org"
    )
    factories.make_guardian(
        school=school, name="David Nguyen", email="david.nguyen@example.org", phone="1"
    )
    factories.make_student(school=school, external_id="S0001", first_name="Kept")
    client = _client(school)
    before = _people(school)

    response = _upload(client, school, EXAMPLE)

    assert response.status_code == 302
    row = RosterImport.objects.get()
    assert response["Location"] == reverse("admin:slips_rosterimport_change", args=[row.pk])
    assert row.status == S.PREVIEWED and row.rows == 4 and row.filename == "roster.csv"
    assert _people(school) == before  # a preview writes nothing of the school
    page = _page(client, row)
    body = page.content.decode()
    counts = row.preview["counts"]
    assert counts["students_added"] == 2 and counts["students_changed"] == 1
    assert counts["guardians_added"] == 2 and counts["guardians_changed"] == 1
    assert counts["students_untouched"] == 1
    assert "1 of the school's students are not in the file" in body
    changed = row.preview["students_changed"][0]
    assert {(c["field"], c["old"], c["new"]) for c in changed["changes"]} == {
        ("first_name", "Olive", "Olivia"),
        ("year_level", "2", "3"),
    }
    [david] = row.preview["guardians_changed"]
    assert {(c["field"], c["old"], c["new"]) for c in david["changes"]} == {
        ("phone", "1", "0400 000 002"),
        ("receives_email", "yes", "no"),  # shown as words: a False would read as a blank
    }
    removals = {(r["kind"], r["name"]) for r in row.preview["removals"]}
    assert removals == {("guardian", str(old_parent)), ("group", "3B")}
    assert "Amelia" in body and "Priya Smith" in body and "Confirm and import" in body

    done = client.post(reverse("admin:slips_rosterimport_confirm", args=[row.pk]), follow=True)

    assert "The roster was imported." in done.content.decode()
    row.refresh_from_db()
    assert row.status == S.DONE and row.csv_text == ""
    assert row.result == {
        "students": 3,
        "guardians": 3,
        "students_created": 2,
        "guardians_created": 2,
    }
    olivia.refresh_from_db()
    assert (olivia.first_name, olivia.year_level) == ("Olivia", "3")
    assert {g.name for g in olivia.groups.all()} == {"Year 3", "3A"}
    assert {g.name for g in olivia.guardians.all()} == {"Sarah Nguyen", "David Nguyen"}
    assert Student.objects.filter(school=school, external_id="S0001").exists()  # never deleted
    # A second confirm (a double click) imports nothing again.
    _confirm(client, row)
    assert Student.objects.filter(school=school).count() == 4


def test_an_invalid_file_lists_every_error_by_line_and_cannot_be_confirmed(school, groups):
    client = _client(school)
    text = "\n".join(
        [
            HEADER,
            "S1,Ann,Lee,3,3A,Pat Lee,not-an-email,,",
            "S2,Bo,Lee,3,Band,Pat Lee,pat@example.org,,",
        ]
    )
    before = _people(school)

    _upload(client, school, text)

    row = RosterImport.objects.get()
    assert row.status == S.INVALID and row.csv_text == ""
    body = _page(client, row).content.decode()
    assert "line 2: invalid guardian email &#x27;not-an-email&#x27;" in body
    assert "line 3: unknown group &#x27;Band&#x27;" in body
    assert "Nothing will be imported until you fix these." in body
    assert "Confirm and import" not in body
    _confirm(client, row)
    row.refresh_from_db()
    assert row.status == S.INVALID
    assert _people(school) == before


def test_too_large_and_not_utf8_files_are_refused_with_a_clear_message(school, settings):
    client = _client(school)
    settings.EDSMART_ROSTER_MAX_BYTES = 1024
    big = _upload(client, school, HEADER + "\n" + "S1,A,B,,,,,,\n" * 200)
    assert big.status_code == 200
    assert "The file is 2 KB; the limit is 1 KB." in str(big.context["adminform"].form.errors)
    data = (HEADER + "\nS1,Zoë,B,,,,,,\n").encode("latin-1")
    latin1 = _upload(client, school, data)
    byte = data.index("ë".encode("latin-1"))
    assert latin1.context["adminform"].form.errors["file"] == [
        f"roster.csv is not UTF-8 text (byte {byte}); save it as 'CSV UTF-8'."
    ]
    assert not RosterImport.objects.exists()


def test_teachers_may_not_import_or_see_imports(school, groups):
    office = _client(school)
    _upload(office, school, EXAMPLE)
    row = RosterImport.objects.get()
    teacher = _client(school, Membership.Role.TEACHER)
    assert teacher.get(ADD_URL).status_code == 403
    assert _upload(teacher, school, EXAMPLE).status_code == 403
    assert _page(teacher, row).status_code == 403
    assert _confirm(teacher, row).status_code == 403
    assert teacher.get(reverse("admin:slips_rosterimport_changelist")).status_code == 403
    assert RosterImport.objects.get().status == S.PREVIEWED
    assert not Student.objects.filter(school=school).exists()


def test_another_schools_import_is_a_404_and_its_school_cannot_be_chosen(
    school, other_school, groups
):
    _upload(_client(other_school), other_school, HEADER + "\nS9,Zed,Other,,,,,,")
    theirs = RosterImport.objects.get(school=other_school)
    mine = _client(school)
    assert _page(mine, theirs).status_code == 404
    assert _confirm(mine, theirs).status_code == 404
    assert mine.get(reverse("admin:slips_rosterimport_changelist")).context["cl"].result_count == 0
    refused = _upload(mine, other_school, EXAMPLE)
    assert refused.status_code == 200 and "school" in refused.context["adminform"].form.errors
    theirs.refresh_from_db()
    assert theirs.status == S.PREVIEWED
    assert not Student.objects.filter(school=school).exists()
    # A teacher in one school who is office staff in another imports only in the second.
    user = factories.make_staff(school=school, role=Membership.Role.TEACHER)
    Membership.objects.create(user=user, school=other_school, role=Membership.Role.OFFICE)
    both = Client()
    both.force_login(user)
    form = both.get(ADD_URL).context["adminform"].form
    assert list(form.fields["school"].queryset) == [other_school]


def test_a_changed_school_gets_a_fresh_preview_instead_of_a_blind_import(school, groups):
    client = _client(school)
    _upload(client, school, EXAMPLE)
    row = RosterImport.objects.get()
    # Meanwhile someone adds David by hand: the import would now update him, not create him.
    factories.make_guardian(school=school, name="David Nguyen", email="david.nguyen@example.org")

    page = client.post(reverse("admin:slips_rosterimport_confirm", args=[row.pk]), follow=True)

    assert "changed since the preview" in page.content.decode()
    row.refresh_from_db()
    assert row.status == S.PREVIEWED
    assert row.preview["counts"]["guardians_added"] == 2
    assert not Student.objects.filter(school=school).exists()
    _confirm(client, row)
    row.refresh_from_db()
    assert row.status == S.DONE
    assert Guardian.objects.filter(school=school, name="David Nguyen").count() == 1


def test_errors_appearing_after_the_preview_refuse_the_import(school, groups):
    client = _client(school)
    _upload(client, school, EXAMPLE)
    row = RosterImport.objects.get()
    groups["5B"].delete()

    _confirm(client, row)

    row.refresh_from_db()
    assert row.status == S.INVALID
    assert row.errors == [
        {"line": 4, "reason": "unknown group '5B' (groups must exist before the import)"}
    ]
    assert not Student.objects.filter(school=school).exists()


def _large_roster(n: int) -> str:
    return "\n".join(
        [HEADER] + [f"L{i},Kid{i},Large,4,,Parent {i},parent{i}@example.org,," for i in range(n)]
    )


def test_a_large_file_runs_as_a_task_with_progress_and_a_second_run_does_nothing(
    school, settings, redis_client, django_capture_on_commit_callbacks, monkeypatch
):
    settings.EDSMART_ROSTER_INLINE_ROWS = 100
    client = _client(school)
    _upload(client, school, _large_roster(450))
    row = RosterImport.objects.get()
    assert row.progress_total == 900  # 450 students and 450 guardians
    assert "imported in the background" in _page(client, row).content.decode()
    sent = []
    monkeypatch.setattr(
        roster_imports.current_app, "send_task", lambda name, args: sent.append((name, args))
    )

    with django_capture_on_commit_callbacks(execute=True):
        _confirm(client, row)

    assert sent == [("slips.tasks.roster_import_run", [row.pk])]
    row.refresh_from_db()
    assert row.status == S.QUEUED
    assert not Student.objects.filter(school=school).exists()
    waiting = _page(client, row).content.decode()
    assert "Waiting to start" in waiting and 'http-equiv="refresh"' in waiting
    # A double click queues nothing more; after two minutes staff may queue it again.
    with django_capture_on_commit_callbacks(execute=True):
        _confirm(client, row)
    assert len(sent) == 1 and "Queue it again" not in waiting
    RosterImport.objects.filter(pk=row.pk).update(
        confirmed_at=timezone.now() - dt.timedelta(minutes=3)
    )
    assert "Queue it again" in _page(client, row).content.decode()
    with django_capture_on_commit_callbacks(execute=True):
        client.post(reverse("admin:slips_rosterimport_confirm", args=[row.pk]), {"requeue": "1"})
    assert sent == [("slips.tasks.roster_import_run", [row.pk])] * 2

    seen = []
    publish = roster_imports._publish
    monkeypatch.setattr(
        roster_imports,
        "_publish",
        lambda pk, done, of: (publish(pk, done, of), seen.append((done, of))),
    )
    assert tasks.roster_import_run(row.pk) is True
    assert seen == [(450, 900), (900, 900)]  # guardians, then students, by chunks
    assert redis_client.get(roster_imports.progress_key(row.pk)) == b"900/900"
    row.refresh_from_db()
    assert (row.status, row.progress_done, row.progress_total) == (S.DONE, 900, 900)
    assert Student.objects.filter(school=school).count() == 450
    assert "Imported" in _page(client, row).content.decode()

    # The task delivered again (a redelivery, a second click's message): nothing happens.
    Student.objects.filter(school=school, external_id="L0").update(first_name="Edited")
    assert tasks.roster_import_run(row.pk) is False
    assert Student.objects.get(school=school, external_id="L0").first_name == "Edited"
    assert Guardian.objects.filter(school=school).count() == 450


@pytest.mark.django_db(transaction=True)
def test_two_deliveries_of_the_task_at_once_import_once(school, settings, redis_client):
    """The fault: a task redelivered while the first delivery is still importing (a worker
    thought lost). Both run for real, each in its own thread and database session."""
    settings.EDSMART_ROSTER_INLINE_ROWS = 0
    client = _client(school)
    _upload(client, school, _large_roster(600))
    row = RosterImport.objects.get()
    _confirm(client, row)
    start = threading.Barrier(2)
    outcomes = []

    def deliver() -> None:
        start.wait()
        try:
            outcomes.append(tasks.roster_import_run(row.pk))
        finally:
            connection.close()

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert sorted(outcomes) == [False, True]
    assert Student.objects.filter(school=school).count() == 600
    assert Guardian.objects.filter(school=school).count() == 600
    row.refresh_from_db()
    assert row.status == S.DONE and row.result["students_created"] == 600


def test_progress_while_queued_is_read_from_redis(school, settings, redis_client):
    settings.EDSMART_ROSTER_INLINE_ROWS = 0
    client = _client(school)
    _upload(client, school, _large_roster(3))
    row = RosterImport.objects.get()
    _confirm(client, row)
    redis_client.set(roster_imports.progress_key(row.pk), "2/6")
    assert "2 of 6 students and guardians written" in _page(client, row).content.decode()


def test_the_command_still_imports_and_refuses(school, groups, tmp_path):
    path = tmp_path / "roster.csv"
    path.write_text(EXAMPLE, encoding="utf-8")
    out = io.StringIO()
    call_command("import_roster", "--school", school.slug, str(path), stdout=out)
    assert "Imported 3 students, 3 guardians" in out.getvalue()
    assert not RosterImport.objects.exists()  # the command keeps no upload record


# --- the preview predicts the write ------------------------------------------------------------


def _predicted(plan) -> dict:
    """The changes a plan announces, in the shape of ``_diff``."""
    return {
        "students_added": {s.entry.external_id for s in plan.students if s.stored is None},
        "students_changed": {
            s.entry.external_id: {name: new for name, (_old, new) in s.changes.items()}
            for s in plan.students
            if s.stored is not None and s.changes
        },
        "guardians_added": sorted(
            tuple(g.values[k] for k in ("name", "email", "phone", "receives_email"))
            for g in plan.guardians
            if g.stored is None
        ),
        "guardians_changed": {
            g.stored.pk: {name: new for name, (_old, new) in g.changes.items()}
            for g in plan.guardians
            if g.stored is not None and g.changes
        },
        "groups": {
            (s.entry.external_id, g.name, sign)
            for s in plan.students
            for sign, gs in (("+", s.groups_added), ("-", s.groups_removed))
            for g in gs
        },
        "links_removed": {
            (s.entry.external_id, g.pk) for s in plan.students for g in s.guardians_removed
        },
        "links_added": sum(len(s.guardians_added) for s in plan.students),
        "untouched": plan.untouched_students,
    }


def _diff(before: dict, after: dict, file_ids: set[str]) -> dict:
    fields = ("first_name", "last_name", "year_level")
    gfields = ("name", "email", "phone", "receives_email")
    b_st, a_st = before["students"], after["students"]
    b_g, a_g = before["guardians"], after["guardians"]
    return {
        "students_added": set(a_st) - set(b_st),
        "students_changed": {
            ext: {
                f: new
                for f, old, new in zip(
                    fields, b_st[ext]["fields"], a_st[ext]["fields"], strict=True
                )
                if old != new
            }
            for ext in set(a_st) & set(b_st)
            if b_st[ext]["fields"] != a_st[ext]["fields"]
        },
        "guardians_added": sorted(v for pk, v in a_g.items() if pk not in b_g),
        "guardians_changed": {
            pk: {
                f: new for f, old, new in zip(gfields, b_g[pk], a_g[pk], strict=True) if old != new
            }
            for pk in b_g
            if b_g[pk] != a_g[pk]
        },
        "groups": {
            (ext, name, sign)
            for ext in a_st
            for sign, names in (
                ("+", a_st[ext]["groups"] - (b_st[ext]["groups"] if ext in b_st else set())),
                ("-", (b_st[ext]["groups"] if ext in b_st else set()) - a_st[ext]["groups"]),
            )
            for name in names
        },
        "links_removed": {
            (ext, pk) for ext in b_st for pk in b_st[ext]["guardians"] - a_st[ext]["guardians"]
        },
        "links_added": sum(
            len(a_st[ext]["guardians"] - (b_st[ext]["guardians"] if ext in b_st else set()))
            for ext in a_st
        ),
        "untouched": len(set(b_st) - file_ids),
    }


def _setup_existing(school, groups) -> None:
    olivia = factories.make_student(
        school=school, external_id="S1001", first_name="Olive", last_name="Nguyen", year_level="2"
    )
    noah = factories.make_student(
        school=school, external_id="S1002", first_name="Noah", last_name="Nguyen", year_level="5"
    )
    groups["3B"].students.add(olivia)
    groups["Choir"].students.add(olivia)
    groups["5B"].students.add(noah)
    factories.make_guardian(school=school, students=[olivia], name="Old", email="old@example.org")
    # Sarah, renamed in the file: the address takes the stored row over.
    factories.make_guardian(
        school=school, students=[noah], name="Sara N", email="SARAH.NGUYEN@example.org"
    )
    # An opted-out David; the file says "no" again (no change) but gives a phone.
    factories.make_guardian(
        school=school, name="David Nguyen", email="david.nguyen@example.org", receives_email=False
    )
    # A family mailbox shared by two stored parents; the file names one of them.
    factories.make_guardian(school=school, name="Priya Smith", email="", phone="0400 000 003")
    factories.make_student(school=school, external_id="S0001", first_name="Kept")


CASES = {
    "empty school": (lambda school, groups: None, EXAMPLE),
    "existing families": (_setup_existing, EXAMPLE),
    "blanks never erase": (
        _setup_existing,
        "\n".join(
            [
                HEADER,
                "S1001,Olivia,Nguyen,,,Sarah Nguyen,sarah.nguyen@example.org,,",
                "S1002,Noah,Nguyen,,,,,,",
            ]
        ),
    ),
    "shared mailbox and renames": (
        _setup_existing,
        "\n".join(
            [
                HEADER,
                "S1001,Olivia,Nguyen,3,3A;Choir,Sam Nguyen,sarah.nguyen@example.org,,",
                "S1001,Olivia,Nguyen,3,3A;Choir,Sarah Nguyen,sarah.nguyen@example.org,,no",
                "S1003,Amelia,Smith,3,Year 3;3B,Priya Smith,,0400 000 003,",
                "S1004,Ari,Smith,K,,Priya Smith,,0400 000 003,",
            ]
        ),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_preview_predicts_exactly_what_the_import_writes(school, groups, case):
    setup, text = CASES[case]
    setup(school, groups)
    before = _people(school)
    preview = roster_preview(school=school, file=io.StringIO(text))
    assert preview.errors == [] and preview.plan is not None
    predicted = _predicted(preview.plan)
    assert _people(school) == before

    roster_import(school=school, file=io.StringIO(text), expected=preview.plan.fingerprint())

    file_ids = {s.entry.external_id for s in preview.plan.students}
    assert _diff(before, _people(school), file_ids) == predicted
    # And again: a second import of the same file is predicted to change nothing, and doesn't.
    again = roster_preview(school=school, file=io.StringIO(text)).plan
    counts = again.summary(limit=10)["counts"]
    assert counts["students_added"] == counts["students_changed"] == 0
    assert counts["guardians_added"] == counts["guardians_changed"] == counts["removals"] == 0


def test_the_task_is_registered_and_routed_to_the_periodic_queue():
    from edsmart.celery import app

    app.loader.import_default_modules()  # what a worker does at start: autodiscovery
    assert "slips.tasks.roster_import_run" in app.tasks
    assert app.amqp.router.route({}, roster_imports.TASK_NAME)["queue"].name == "periodic"
