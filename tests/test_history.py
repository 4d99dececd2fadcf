"""A year of history: summaries of closed mailings, windowed checks, retention, admin paging.

Mailings here go through the real pipeline (dispatch, batches against the test SMTP server,
the sweep); only the passing of time is made, by moving a summary's or a row's timestamps
into the past, as a year would.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import threading
import time

import psycopg
import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connection, transaction
from django.db.models import F
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from edsmart import admin_paging
from notifications import (
    alerts,
    batch,
    controls,
    metrics,
    retention,
    selectors,
    summaries,
    sweep,
    transitions,
)
from notifications.mailer import Outcome, SendResult
from notifications.models import (
    Alert,
    Delivery,
    DeliveryEvent,
    DeliveryStatus,
    Mailing,
    MailingSummary,
)
from slips.models import School
from tests import factories

# Batches must commit each start before talking to the mail server.
pytestmark = pytest.mark.django_db(transaction=True)
S = DeliveryStatus


@pytest.fixture(autouse=True)
def plain_static(settings):
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


def drain(mailing_id: int) -> None:
    for _ in range(20):
        if not batch.batch_send(mailing_id=mailing_id).claimed:
            break


def sent_mailing(school: School, families: int = 3) -> Mailing:
    """A broadcast dispatched and sent through the pipeline; not yet swept."""
    _, mailing_id = factories.broadcast_dispatched(school=school, families=families)
    drain(mailing_id)
    return Mailing.objects.get(pk=mailing_id)


def age(mailing: Mailing, *, days: float) -> None:
    """Make ``mailing`` (summarised) look closed ``days`` ago, rows and events included."""
    past = timezone.now() - dt.timedelta(days=days)
    Mailing.objects.filter(pk=mailing.pk).update(created_at=past, completed_at=past)
    MailingSummary.objects.filter(mailing_id=mailing.pk).update(summarised_at=past)
    rows = Delivery.objects.filter(mailing_id=mailing.pk)
    rows.filter(sent_at__isnull=False).update(sent_at=past)
    rows.update(created_at=past, updated_at=past)
    DeliveryEvent.objects.filter(delivery__mailing_id=mailing.pk).update(at=past)


def live_counts(mailing: Mailing) -> dict[str, int]:
    return selectors.delivery_status_counts(deliveries=Delivery.objects.filter(mailing=mailing))


# --- summaries ---------------------------------------------------------------------------------


def test_the_sweep_summarises_a_closed_mailing_and_no_count_moves(school, smtp, redis_client):
    mailing = sent_mailing(school, families=3)
    before, sends_before = summaries.status_totals()
    assert sends_before == 3 and before[S.SENT] == 3
    report = sweep.sweep()
    assert report.completed == 1 and report.summarised == 1
    mailing.refresh_from_db()
    assert mailing.status == Mailing.Status.COMPLETED and mailing.summarised
    summary = MailingSummary.objects.get(mailing=mailing)
    assert (summary.sent, summary.accepted, summary.school_id) == (3, 3, school.pk)
    assert summaries.status_totals() == (before, sends_before)
    assert selectors.mailing_counts(mailing=mailing) == live_counts(mailing)
    # A second sweep finds nothing more to summarise.
    assert sweep.sweep().summarised == 0


def test_a_settled_unknown_unsummarises_and_the_send_counter_only_grows(school, smtp, redis_client):
    mailing = sent_mailing(school, families=3)
    row = Delivery.objects.filter(mailing=mailing).first()
    # As the sweeper leaves a send whose worker vanished after DATA.
    Delivery.objects.filter(pk=row.pk).update(
        status=S.UNKNOWN, accepted=0, sent_at=None, attempt=F("attempt") + 1
    )
    sweep.sweep()
    summary = MailingSummary.objects.get(mailing=mailing)
    assert (summary.sent, summary.unknown, summary.accepted) == (2, 1, 2)
    assert summaries.status_totals()[1] == 2

    controls.unknowns_resolve(delivery_ids=[row.pk], resolution="sent", actor="ops-kim")
    mailing.refresh_from_db()
    assert not mailing.summarised and not MailingSummary.objects.filter(mailing=mailing).exists()
    counts, sends = summaries.status_totals()
    assert (counts[S.SENT], counts[S.UNKNOWN], sends) == (3, 0, 3)
    sweep.sweep()
    summary = MailingSummary.objects.get(mailing=mailing)
    assert (summary.sent, summary.unknown, summary.accepted) == (3, 0, 3)
    assert summaries.status_totals()[1] == 3


def test_a_summary_waits_for_a_move_that_holds_its_mailing(school, smtp, redis_client):
    """The send counter must never step back: a summary written from a snapshot taken before
    a late acceptance committed would hide an acceptance a scrape had already counted."""
    mailing = sent_mailing(school, families=2)
    row = Delivery.objects.filter(mailing=mailing).first()
    Delivery.objects.filter(pk=row.pk).update(status=S.UNKNOWN, accepted=0, sent_at=None)
    Mailing.objects.filter(pk=mailing.pk).update(status=Mailing.Status.COMPLETED)
    held, moved = threading.Event(), threading.Event()

    def late_acceptance() -> None:
        try:
            with transaction.atomic():
                summaries.mailing_hold(mailing.pk)
                held.set()
                moved.wait(5)
                Delivery.objects.filter(pk=row.pk).update(status=S.SENT, accepted=F("accepted") + 1)
                summaries.mailings_unsummarise([mailing.pk])
        finally:
            connection.close()

    mover = threading.Thread(target=late_acceptance)
    mover.start()
    assert held.wait(5)
    result: list[list[int]] = []

    def summarise() -> None:
        try:
            result.append(summaries.mailings_summarise([mailing.pk]))
        finally:
            connection.close()

    summariser = threading.Thread(target=summarise)
    summariser.start()
    time.sleep(0.3)
    assert summariser.is_alive()  # waiting for the move, not counting around it
    moved.set()
    mover.join(5)
    summariser.join(5)
    assert result == [[mailing.pk]]
    summary = MailingSummary.objects.get(mailing=mailing)
    assert (summary.sent, summary.unknown, summary.accepted) == (2, 0, 2)
    assert summaries.status_totals()[1] == 2


def test_a_late_failure_of_an_unknown_updates_a_summarised_mailing(school, smtp, redis_client):
    """A definite refusal can still arrive for a row the sweeper turned unknown, after its
    mailing closed and was summarised: the summary must follow the row."""
    mailing = sent_mailing(school, families=2)
    row = Delivery.objects.filter(mailing=mailing).first()
    Delivery.objects.filter(pk=row.pk).update(status=S.UNKNOWN, accepted=0, sent_at=None)
    sweep.sweep()
    assert MailingSummary.objects.get(mailing=mailing).unknown == 1
    row.refresh_from_db()
    claimed = transitions.Claimed(
        id=row.pk,
        attempt=row.attempt,
        tries=row.tries,
        mailing_id=mailing.pk,
        school_id=school.pk,
        email=row.email,
        recipient_name=row.recipient_name,
        student_ids=row.student_ids,
    )
    refused = SendResult(outcome=Outcome.FAILED, detail="550 no such user")
    assert transitions.delivery_record(claimed=claimed, result=refused) == S.FAILED
    assert not Mailing.objects.get(pk=mailing.pk).summarised
    sweep.sweep()
    summary = MailingSummary.objects.get(mailing=mailing)
    assert (summary.sent, summary.failed, summary.unknown) == (1, 1, 0)


def test_a_resend_reopens_a_summarised_mailing(school, smtp, redis_client):
    mailing = sent_mailing(school, families=2)
    row = Delivery.objects.filter(mailing=mailing).first()
    Delivery.objects.filter(pk=row.pk).update(status=S.UNKNOWN, accepted=0, sent_at=None)
    sweep.sweep()
    assert Mailing.objects.get(pk=mailing.pk).summarised
    controls.unknowns_resolve(delivery_ids=[row.pk], resolution="resend", actor="ops-kim")
    mailing.refresh_from_db()
    assert mailing.status == Mailing.Status.SENDING and not mailing.summarised
    drain(mailing.pk)
    sweep.sweep()
    mailing.refresh_from_db()
    assert mailing.status == Mailing.Status.COMPLETED and mailing.summarised
    assert MailingSummary.objects.get(mailing=mailing).sent == 2


def test_a_late_retry_in_a_summarised_cancelled_mailing_is_still_cancelled(
    school, smtp, redis_client
):
    """A late 4xx can bring a row of a cancelled, summarised mailing back to retry_wait; the
    summary must not hide it from the sweep's orphan cancel."""
    mailing = sent_mailing(school, families=3)
    row = Delivery.objects.filter(mailing=mailing).first()
    Delivery.objects.filter(pk=row.pk).update(status=S.UNKNOWN, accepted=0, sent_at=None)
    Mailing.objects.filter(pk=mailing.pk).update(status=Mailing.Status.CANCELLED)
    sweep.sweep()
    assert MailingSummary.objects.get(mailing=mailing).unknown == 1
    # What the batch does on a late 4xx for the unknown row.
    Delivery.objects.filter(pk=row.pk).update(status=S.RETRY_WAIT)
    transitions.mailings_reopen(mailing_ids=[mailing.pk])
    assert not Mailing.objects.get(pk=mailing.pk).summarised
    sweep.sweep()
    assert Delivery.objects.get(pk=row.pk).status == S.CANCELLED
    summary = MailingSummary.objects.get(mailing=mailing)
    assert (summary.sent, summary.cancelled, summary.unknown) == (2, 1, 0)


# --- windowed checks ---------------------------------------------------------------------------


def test_a_duplicate_trips_the_breaker_whatever_the_history(
    school, other_school, smtp, redis_client
):
    """The duplicate check reads only rows accepted more than once (a partial index), so it
    finds one in a new mailing beside closed, summarised history, and one in a mailing
    closed long ago."""
    for _ in range(3):
        old = sent_mailing(other_school, families=2)
    sweep.sweep()
    age(old, days=200)
    fresh = sent_mailing(school, families=2)
    dup = Delivery.objects.filter(mailing=fresh).first()
    Delivery.objects.filter(pk=dup.pk).update(accepted=F("accepted") + 1)
    report = alerts.watch()
    assert report.breaker_tripped == [school.pk]
    assert School.objects.get(pk=school.pk).sending_paused

    old_row = Delivery.objects.filter(mailing=old).first()
    Delivery.objects.filter(pk=old_row.pk).update(accepted=F("accepted") + 1)
    assert alerts.watch().breaker_tripped == [other_school.pk]
    assert Alert.objects.filter(kind="duplicate", cleared_at__isnull=True).count() == 2


def test_failure_rate_and_latency_read_only_the_window(school, smtp, redis_client):
    old = sent_mailing(school, families=4)
    sweep.sweep()
    old_row = Delivery.objects.filter(mailing=old).first()
    DeliveryEvent.objects.create(
        delivery=old_row, attempt=1, from_status=S.SUBMITTING, to_status=S.FAILED
    )
    age(old, days=2)
    recent = sent_mailing(school, families=3)
    row = Delivery.objects.filter(mailing=recent).first()
    DeliveryEvent.objects.create(
        delivery=row, attempt=1, from_status=S.SUBMITTING, to_status=S.FAILED
    )
    recent_sends = Delivery.objects.filter(mailing=recent, status=S.SENT).count()
    assert recent_sends == 7  # the whole school: the old mailing's four families and three new
    rate = selectors.failure_rate(since=timezone.now() - dt.timedelta(minutes=15))
    assert (rate.failed, rate.sent) == (1, recent_sends)
    _, total, _ = metrics.send_latency(window_seconds=3600)
    assert total == recent_sends
    # The old mailing still counts in all-time totals.
    assert summaries.status_totals()[1] == 4 + recent_sends


# --- retention ----------------------------------------------------------------------------------


def test_retention_archives_an_old_message_and_touches_nothing_open_or_recent(
    school, smtp, redis_client, settings
):
    settings.EDSMART_DELIVERY_RETENTION_DAYS = 400
    old_broadcast, old_id = factories.broadcast_dispatched(school=school, families=5)
    drain(old_id)
    old_rows = list(Delivery.objects.filter(mailing_id=old_id).order_by("pk"))
    Delivery.objects.filter(pk=old_rows[0].pk).update(opened_at=timezone.now())
    DeliveryEvent.objects.create(
        delivery=old_rows[1], attempt=1, from_status=S.SUBMITTING, to_status=S.RETRY_WAIT
    )
    held = sent_mailing(school, families=2)  # closed long ago, but an outcome awaits a person
    held_row = Delivery.objects.filter(mailing=held).first()
    Delivery.objects.filter(pk=held_row.pk).update(status=S.UNKNOWN, accepted=0, sent_at=None)
    recent = sent_mailing(school, families=2)
    sweep.sweep()
    old = Mailing.objects.get(pk=old_id)
    age(old, days=401)
    age(held, days=500)
    age(recent, days=399)
    # Open: dispatched long ago and still sending (its rows are pending).
    _, open_id = factories.broadcast_dispatched(school=school, families=2)
    Mailing.objects.filter(pk=open_id).update(created_at=timezone.now() - dt.timedelta(days=600))

    totals_before = summaries.status_totals()
    counts_before = selectors.source_counts(old_broadcast)
    keep = set(Delivery.objects.exclude(mailing_id=old_id).values_list("pk", flat=True))

    report = retention.history_prune(batch_rows=2)
    assert report.archived == [old_id]
    assert report.rows_removed == 5 and report.mailings_emptied == [old_id]
    assert not Delivery.objects.filter(mailing_id=old_id).exists()
    assert not DeliveryEvent.objects.filter(delivery_id__in=[r.pk for r in old_rows]).exists()
    assert set(Delivery.objects.values_list("pk", flat=True)) == keep
    summary = MailingSummary.objects.get(mailing_id=old_id)
    assert (summary.sent, summary.accepted, summary.opened) == (5, 5, 1)
    assert summary.archived_at is not None and summary.rows_removed_at is not None
    # What staff and Prometheus read does not move.
    assert summaries.status_totals() == totals_before
    assert selectors.source_counts(old_broadcast) == counts_before
    assert selectors.broadcast_reach(broadcast=old_broadcast).opened == 1
    assert Mailing.objects.filter(pk=old_id).exists()  # the message itself stays

    again = retention.history_prune(batch_rows=2)
    assert (again.archived, again.rows_removed, again.mailings_emptied) == ([], 0, [])
    assert summaries.status_totals() == totals_before
    # An archived summary is final: a stray unsummarise leaves it.
    assert summaries.mailings_unsummarise([old_id]) == 0
    assert Mailing.objects.get(pk=old_id).summarised


def test_retention_stops_at_its_budget_and_the_next_run_finishes(school, smtp, redis_client):
    mailing = sent_mailing(school, families=3)
    sweep.sweep()
    age(mailing, days=500)
    first = retention.history_prune(budget_seconds=0)
    assert first.archived == [mailing.pk] and first.out_of_time and first.rows_removed == 0
    second = retention.history_prune(batch_rows=2)
    assert second.archived == [] and second.rows_removed == 3
    assert not Delivery.objects.filter(mailing=mailing).exists()


def test_retention_never_waits_on_a_lock(school, smtp, redis_client, settings):
    """A batch whose rows someone else holds gives up within its lock timeout and leaves them
    for the next run, instead of queueing behind (or in front of) other work."""
    mailing = sent_mailing(school, families=2)
    sweep.sweep()
    age(mailing, days=500)
    url = settings.DATABASES["default"]
    with psycopg.connect(
        host=url["HOST"], port=url["PORT"], user=url["USER"], dbname=url["NAME"]
    ) as other:
        other.execute(
            "SELECT id FROM notifications_delivery WHERE mailing_id = %s FOR UPDATE",
            [mailing.pk],
        )
        started = time.monotonic()
        held = retention.history_prune()
        assert time.monotonic() - started < 10
        assert held.lock_waits == 1 and held.rows_removed == 0
        other.rollback()
    assert Delivery.objects.filter(mailing=mailing).count() == 2
    assert retention.history_prune().rows_removed == 2


def test_history_prune_command(school, smtp, redis_client):
    mailing = sent_mailing(school, families=2)
    sweep.sweep()
    age(mailing, days=30)
    out = io.StringIO()
    call_command("history_prune", "--days", "10", "--dry-run", stdout=out)
    assert json.loads(out.getvalue())["mailings_due"] == 1
    assert Delivery.objects.filter(mailing=mailing).count() == 2
    out = io.StringIO()
    call_command("history_prune", "--days", "10", stdout=out)
    assert json.loads(out.getvalue())["rows_removed"] == 2


# --- reports and pages --------------------------------------------------------------------------


def test_delivery_report_lists_the_newest_mailings(school, smtp, redis_client):
    ids = [sent_mailing(school, families=1).pk for _ in range(3)]
    sweep.sweep()
    out = io.StringIO()
    call_command("delivery_report", "--json", "--limit", "2", stdout=out)
    report = json.loads(out.getvalue())
    assert [row["mailing"] for row in report["mailings"]] == ids[1:]
    # Each broadcast goes to the whole school, which has one family more each time.
    assert report["more"] is True and report["totals"][S.SENT] == 2 + 3
    assert report["all_time"][S.SENT] == 1 + 2 + 3
    out = io.StringIO()
    call_command("delivery_report", "--json", "--limit", "0", stdout=out)
    report = json.loads(out.getvalue())
    assert [row["mailing"] for row in report["mailings"]] == ids and not report["more"]


def staff_client(client, school: School):
    client.force_login(factories.make_staff(school=school))
    return client


def test_admin_lists_draw_a_page_from_an_estimate_without_counting(
    school, smtp, redis_client, client, monkeypatch
):
    mailing = sent_mailing(school, families=6)
    with connection.cursor() as cur:
        cur.execute("ANALYZE notifications_delivery")
    monkeypatch.setattr(admin_paging, "EXACT_BELOW", 3)
    staff_client(client, school)
    url = reverse("admin:notifications_delivery_changelist")
    with CaptureQueriesContext(connection) as queries:
        page = client.get(url, {"mailing__id__exact": mailing.pk}, secure=True)
    assert page.status_code == 200
    assert page.context["cl"].paginator.estimated
    assert "about 6 deliveries" in page.content.decode()
    counts = [q["sql"] for q in queries if "COUNT(" in q["sql"].upper()]
    unbounded = [sql for sql in counts if "notifications_delivery" in sql and "LIMIT 4" not in sql]
    assert not unbounded, counts
    # Newest first.
    shown = [d.pk for d in page.context["cl"].result_list]
    assert shown == sorted(shown, reverse=True) and len(shown) == 6

    monkeypatch.setattr(admin_paging, "EXACT_BELOW", 10_000)
    page = client.get(url, secure=True)
    assert not page.context["cl"].paginator.estimated
    assert "6 deliveries" in page.content.decode() and "about" not in page.content.decode()


def test_staff_find_a_parents_deliveries_by_address_in_their_school_only(
    school, other_school, client
):
    own = factories.make_mailing(factories.make_broadcast(school=school))
    theirs = factories.make_mailing(factories.make_broadcast(school=other_school))
    for mailing in (own, theirs):
        Delivery.objects.create(
            mailing=mailing,
            school=mailing.school,
            email="Pat.Lee@Example.org",
            email_normalized="pat.lee@example.org",
        )
    staff_client(client, school)
    url = reverse("admin:notifications_delivery_changelist")
    page = client.get(url, {"q": " PAT.LEE@example.org "}, secure=True)
    assert [d.mailing_id for d in page.context["cl"].result_list] == [own.pk]
    assert (
        list(client.get(url, {"q": "nobody@example.org"}, secure=True).context["cl"].result_list)
        == []
    )


def test_message_filters_apply_an_id_they_do_not_list(school, client):
    old = factories.make_broadcast(school=school)
    mailing = factories.make_mailing(old)
    Delivery.objects.create(
        mailing=mailing, school=school, email="a@example.org", email_normalized="a@example.org"
    )
    type(old).objects.filter(pk=old.pk).update(created_at=timezone.now() - dt.timedelta(days=90))
    staff_client(client, school)
    url = reverse("admin:notifications_delivery_changelist")
    page = client.get(url, {"mailing__broadcast__id__exact": old.pk}, secure=True)
    assert page.status_code == 200 and len(page.context["cl"].result_list) == 1
    other = factories.make_broadcast(school=factories.make_school(slug="elsewhere"))
    page = client.get(url, {"mailing__broadcast__id__exact": other.pk}, secure=True)
    assert list(page.context["cl"].result_list) == []


def test_ops_page_lists_schools_with_something_to_see_and_finds_the_others(client, school):
    quiet = factories.make_school(slug="quiet-one", name="Quiet One")
    factories.make_school(slug="paused-one", name="Paused One", sending_paused=True)
    user = get_user_model().objects.create_superuser("root", "root@example.org", "pw-tests-only")
    client.force_login(user)
    factories.broadcast_dispatched(school=school, families=1)
    page = client.get("/ops/", secure=True)
    listed = {row.school.slug for row in page.context["rows"]}
    assert listed == {school.slug, "paused-one"}
    assert page.context["schools_quiet"] == 1
    found = client.get("/ops/", {"q": "quiet"}, secure=True)
    assert quiet.pk in {row.school.pk for row in found.context["rows"]}
