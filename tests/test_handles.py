"""Message handles (``slip:3``, ``broadcast:3``, ``mailing:3``): what ``compose`` prints, what
``delivery_report`` lists, what the admin shows, and what every ops command takes as it is.

A bare number is refused: slips, broadcasts and mailings each number from 1, so ``3`` named a
mailing to the ops commands and a slip or a broadcast to whoever had just run ``compose``
(project issue 13: ``compose broadcast`` printed ``1`` and ``delivery_report --message 1``
reported the demo slip).
"""

from __future__ import annotations

import json
import re
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse

from notifications import dispatch, selectors
from notifications.models import Delivery, DeliveryStatus, Mailing
from slips.models import Broadcast, SendStatus, Slip
from tests import factories

pytestmark = pytest.mark.django_db
S = DeliveryStatus
FORMS = ("slip:N", "broadcast:N", "mailing:N")


def run(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def compose(kind: str, school, title: str) -> str:
    return run(
        "compose", kind, "--school", school.slug, "--audience", "all",
        "--title", title, "--body", "Hello.",
    )  # fmt: skip


@pytest.fixture
def composed(school, redis_client) -> dict[str, Slip | Broadcast]:
    """Three broadcasts and two slips composed with the command, then dispatched: compose's
    exact output (newline included) -> the message it made."""
    for _ in range(3):
        factories.make_family(school=school)
    made: dict[str, Slip | Broadcast] = {}
    for n, kind in enumerate(["broadcast", "slip", "broadcast", "slip", "broadcast"]):
        before = {*Slip.objects.all(), *Broadcast.objects.all()}
        output = compose(kind, school, f"{kind} {n}")
        [made[output]] = {*Slip.objects.all(), *Broadcast.objects.all()} - before
    assert len(dispatch.dispatch_due()) == 5
    return made


def _kind(obj: Slip | Broadcast) -> str:
    return "slip" if isinstance(obj, Slip) else "broadcast"


def test_compose_prints_the_handle_of_what_it_made(composed):
    for output, obj in composed.items():
        assert output == f"{_kind(obj)}:{obj.pk}\n"
        assert obj.title.startswith(_kind(obj))
        assert selectors.message_lookup(output) == obj


def test_delivery_report_takes_composes_output_as_it_is(composed):
    for output, obj in composed.items():
        report = json.loads(run("delivery_report", "--message", output, "--json"))
        [row] = report["mailings"]
        mailing = Mailing.objects.get(pk=row["mailing"])
        assert mailing.source == obj
        assert row["handle"] == f"mailing:{mailing.pk}"
        assert row["message"] == output.strip()
        assert row["subject"] == obj.title
        assert report["totals"] == selectors.source_counts(obj)
        assert report["totals"][S.PENDING] == 3


def test_delivery_reports_mailing_handles_are_accepted_as_they_are(composed):
    text = run("delivery_report")
    listed = re.findall(r"^(mailing:\d+)\s+((?:slip|broadcast):\d+)\s", text, flags=re.M)
    assert len(listed) == 5
    assert {message for _, message in listed} == {out.strip() for out in composed}
    for mailing_handle, message_handle in listed:
        report = json.loads(run("delivery_report", "--message", mailing_handle, "--json"))
        [row] = report["mailings"]
        assert (row["handle"], row["message"]) == (mailing_handle, message_handle)


def test_sending_takes_composes_output_as_it_is(composed):
    (output, target), *others = composed.items()
    assert f"Message {output.strip()} paused." in run("sending", "pause", "--message", output)
    target.refresh_from_db()
    assert target.status == SendStatus.PAUSED
    assert Mailing.objects.get(**{_kind(target): target}).status == Mailing.Status.PAUSED
    for _, other in others:
        other.refresh_from_db()
        assert other.status == SendStatus.SENDING
    assert Mailing.objects.filter(status=Mailing.Status.PAUSED).count() == 1
    run("sending", "resume", "--message", output)
    target.refresh_from_db()
    assert target.status == SendStatus.SENDING


def test_resolve_unknown_takes_composes_output_as_it_is(composed):
    Delivery.objects.update(status=S.UNKNOWN, last_error="stalled")
    (output, target), *others = list(composed.items())[::-1]
    out = run("resolve_unknown", "--message", output, "--mark-failed", "--actor", "amy")
    assert "Resolved 3" in out
    assert set(selectors.deliveries_of(target).values_list("status", flat=True)) == {S.FAILED}
    for _, other in others:
        assert set(selectors.deliveries_of(other).values_list("status", flat=True)) == {S.UNKNOWN}


@pytest.mark.parametrize(
    "command",
    [
        ["delivery_report", "--json", "--message"],
        ["sending", "pause", "--message"],
        ["sending", "resume", "--message"],
        ["resolve_unknown", "--mark-failed", "--message"],
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_every_command_refuses_a_bare_number_and_lists_the_forms(composed, command):
    Delivery.objects.update(status=S.UNKNOWN, last_error="stalled")
    # The bare ids compose would once have printed, and mailing ids: each names nothing now.
    bare = {str(obj.pk) for obj in composed.values()} | {
        str(pk) for pk in Mailing.objects.values_list("pk", flat=True)
    }
    for number in sorted(bare):
        with pytest.raises(CommandError) as info:
            run(*command, number)
        text = str(info.value)
        assert "bare number" in text
        assert all(form in text for form in FORMS), text
    # Nothing was paused or resolved on the strength of a guess.
    assert not Mailing.objects.exclude(status=Mailing.Status.SENDING).exists()
    assert set(Delivery.objects.values_list("status", flat=True)) == {S.UNKNOWN}


@pytest.mark.parametrize(
    ("handle", "error"),
    [
        ("", "not a message handle"),
        ("slip", "not a message handle"),
        ("slip:", "not a message handle"),
        ("slip:abc", "not a message handle"),
        ("slip:-3", "not a message handle"),
        ("slip:3:4", "not a message handle"),
        ("slip: 3", "not a message handle"),
        ("slip:٣", "not a message handle"),  # a digit, but not an ASCII one
        ("٣", "bare number"),
        ("memo:3", "'memo' is not a message kind"),
        ("mailing:0", "no mailing with id 0"),
        ("broadcast:999999999", "no broadcast with id 999999999"),
        ("slip:9223372036854775808", "no slip with id"),  # past bigint
        ("slip:" + "9" * 5000, "no slip with id"),  # past Python's int() limit
    ],
)
def test_malformed_or_dangling_handles_are_refused_with_the_forms(handle, error):
    with pytest.raises(selectors.UnknownMessage) as info:
        selectors.message_lookup(handle)
    assert error in str(info.value)
    if not error.startswith("no "):  # a handle of the wrong shape: say which shapes work
        assert all(form in str(info.value) for form in FORMS)


def test_handles_are_read_leniently_as_to_case_and_surrounding_space(school):
    slip = factories.make_slip(school=school)
    for text in (f"slip:{slip.pk}", f" Slip:{slip.pk}\n", f"SLIP:00{slip.pk}"):
        assert selectors.message_lookup(text) == slip
    assert selectors.message_handle(slip) == f"slip:{slip.pk}"


# --- the admin -----------------------------------------------------------------------------------


@pytest.fixture
def staff_client(school) -> Client:
    client = Client()
    client.force_login(factories.make_staff(school=school))
    return client


def _shown(page: str, handle: str) -> bool:
    """The handle is the content of a list cell or read-only field of its own."""
    cell = rf'class="[^"]*field-message_handle[^"]*"[^>]*>(?:<a [^>]*>)?{re.escape(handle)}<'
    readonly = rf'<div class="readonly">{re.escape(handle)}</div>'
    return bool(re.search(cell, page) or re.search(readonly, page))


@pytest.mark.usefixtures("web_settings")
def test_the_admin_shows_each_messages_handle_on_its_list_and_change_pages(composed, staff_client):
    pages = []
    for obj in composed.values():
        kind = _kind(obj)
        mailing = Mailing.objects.get(**{kind: obj})
        pages += [
            (reverse(f"admin:slips_{kind}_changelist"), f"{kind}:{obj.pk}"),
            (reverse(f"admin:slips_{kind}_change", args=[obj.pk]), f"{kind}:{obj.pk}"),
            (reverse("admin:notifications_mailing_changelist"), f"mailing:{mailing.pk}"),
            (
                reverse("admin:notifications_mailing_change", args=[mailing.pk]),
                f"mailing:{mailing.pk}",
            ),
        ]
    for url, handle in pages:
        response = staff_client.get(url)
        assert response.status_code == 200, url
        assert _shown(response.content.decode(), handle), (url, handle)


@pytest.mark.usefixtures("web_settings")
def test_the_add_page_of_a_new_message_has_no_handle_yet(staff_client):
    for kind in ("slip", "broadcast"):
        page = staff_client.get(reverse(f"admin:slips_{kind}_add"))
        assert page.status_code == 200
        assert "field-message_handle" not in page.content.decode()
