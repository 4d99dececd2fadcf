"""The school in the send engine's keys (docs/scaling.md, migrations 0011 to 0013).

Every delivery event carries its delivery's school and mailing, written by the move itself
(checked on each kind of move that writes an event, through the real pipeline), and 0011 fills
in the events written before it. A delivery's school is its mailing's (a composite foreign
key), so the fan-out's guard, unique (school, mailing, address), is as strict as (mailing,
address): a second row for a pair is refused whatever school it claims. Likewise a mailing's
school is its slip's or broadcast's, so dispatch's guards keyed by school (0013) are as strict
as before. 0012 and 0013 run backwards and forwards again with a guard in force at each step.
The per-email statements name the row's school: a claim that names another school moves
nothing.
"""

from __future__ import annotations

import dataclasses
import importlib
import types

import pytest
from django.db import IntegrityError, connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from notifications import batch, controls, dispatch, sweep, transitions
from notifications.mailer import Outcome, SendResult
from notifications.models import Delivery, DeliveryEvent, DeliveryStatus, Mailing
from slips.services import message_schedule
from tests import factories

S = DeliveryStatus
pytestmark = pytest.mark.django_db(transaction=True)


def _broadcast(school, families: int) -> int:
    for _ in range(families):
        factories.make_family(school=school)
    broadcast = factories.make_broadcast(school=school)
    message_schedule(message=broadcast, send_at=timezone.now())
    [mailing_id] = dispatch.dispatch_due()
    return mailing_id


def _mismatched() -> list[tuple]:
    wrong = DeliveryEvent.objects.exclude(
        Q(school_id=F("delivery__school_id")) & Q(mailing_id=F("delivery__mailing_id"))
    )
    return list(wrong.values_list("id", "to_status", "school_id", "mailing_id"))


def test_each_kind_of_move_writes_the_school_and_mailing(
    school, other_school, smtp, settings, redis_client
):
    settings.EMAIL_TIMEOUT = 0.5
    # A refusal then a failure, in one school...
    first = _broadcast(school, families=3)
    smtp.behaviour.fail_first = 1
    smtp.behaviour.rcpt_reply = ""
    batch.batch_send(mailing_id=first)
    # ...a cancel, a lease expiry and an unknown in another.
    second = _broadcast(other_school, families=4)
    a, _, _, d = Delivery.objects.filter(mailing_id=second).order_by("pk")
    transitions.deliveries_cancel(delivery_ids=[a.pk], actor="office", detail="not needed")
    claims = transitions.deliveries_claim(limit=1, mailing_id=second)
    Delivery.objects.filter(pk__in=[c.id for c in claims]).update(lease_until=timezone.now())
    transitions.claims_expire()
    Delivery.objects.filter(pk=d.pk).update(
        status=S.SUBMITTING, lease_until=timezone.now(), attempt=1, tries=1
    )
    transitions.submits_expire()
    assert controls.unknowns_resolve(delivery_ids=[d.pk], resolution="failed", actor="ops")
    sweep.sweep()

    kinds = set(DeliveryEvent.objects.values_list("to_status", flat=True))
    assert {S.RETRY_WAIT, S.CANCELLED, S.PENDING, S.UNKNOWN, S.FAILED} <= kinds, kinds
    assert DeliveryEvent.objects.filter(school_id__isnull=True).count() == 0
    assert _mismatched() == []
    assert set(DeliveryEvent.objects.values_list("school_id", flat=True)) == {
        school.pk,
        other_school.pk,
    }


def test_the_migration_fills_in_older_events(school, smtp, redis_client):
    mailing_id = _broadcast(school, families=3)
    rows = list(Delivery.objects.filter(mailing_id=mailing_id))
    # Events as a release before 0011 wrote them: no school, no mailing.
    for row in rows:
        for attempt in (1, 2):
            DeliveryEvent.objects.create(
                delivery=row, attempt=attempt, from_status=S.SUBMITTING, to_status=S.RETRY_WAIT
            )
    assert DeliveryEvent.objects.filter(school_id__isnull=True).count() == 6
    migration = importlib.import_module("notifications.migrations.0011_event_school_and_mailing")
    migration.BATCH = 2  # several batches, and ids that do not start at a batch boundary
    migration.fill(None, types.SimpleNamespace(connection=connection))
    assert DeliveryEvent.objects.filter(school_id__isnull=True).count() == 0
    assert _mismatched() == []


def _refused(fn) -> bool:
    try:
        with transaction.atomic():  # the foreign keys are checked at commit (deferred)
            fn()
    except IntegrityError:
        return True
    return False


def test_a_second_row_for_a_pair_is_refused_whatever_school_it_claims(
    school, other_school, redis_client
):
    mailing_id = _broadcast(school, families=1)
    row = Delivery.objects.get(mailing_id=mailing_id)

    def again(school_id: int) -> None:
        Delivery.objects.create(
            mailing_id=mailing_id,
            school_id=school_id,
            email=row.email,
            email_normalized=row.email_normalized,
        )

    assert _refused(lambda: again(school.pk))  # the unique guard
    assert _refused(lambda: again(other_school.pk))  # the mailing's school, not another
    assert Delivery.objects.filter(mailing_id=mailing_id).count() == 1


def _constraints() -> set[str]:
    with connection.cursor() as cur:
        cur.execute(
            "SELECT conname FROM pg_constraint WHERE conrelid IN "
            "('notifications_delivery'::regclass, 'notifications_mailing'::regclass, "
            "'notifications_deliveryevent'::regclass) AND convalidated"
        )
        return {name for (name,) in cur.fetchall()}


NEW = {
    "mailing_school_id_key",
    "delivery_mailing_same_school",
    "delivery_one_per_school_mailing_address",
}


def test_0012_goes_back_and_forth_with_a_guard_at_every_step(school, redis_client):
    migration = importlib.import_module("notifications.migrations.0012_school_in_delivery_keys")
    mailing_id = _broadcast(school, families=2)
    assert _constraints() >= NEW
    assert "delivery_one_per_mailing_address" not in _constraints()
    with connection.schema_editor(atomic=False) as editor:
        migration.backwards(None, editor)
    try:
        assert "delivery_one_per_mailing_address" in _constraints()
        assert not NEW & _constraints()
        # The old guard holds meanwhile.
        row = Delivery.objects.filter(mailing_id=mailing_id).first()
        assert _refused(
            lambda: Delivery.objects.create(
                mailing_id=mailing_id,
                school_id=school.pk,
                email=row.email,
                email_normalized=row.email_normalized,
            )
        )
    finally:
        with connection.schema_editor(atomic=False) as editor:
            migration.forwards(None, editor)
    assert _constraints() >= NEW
    assert "delivery_one_per_mailing_address" not in _constraints()
    with connection.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE c.relname LIKE 'delivery%%' AND NOT i.indisvalid"
        )
        assert cur.fetchone()[0] == 0


def _indexes(table: str) -> dict[str, bool]:
    """The table's unique indexes, each with whether it is valid."""
    with connection.cursor() as cur:
        cur.execute(
            "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c "
            "ON c.oid = i.indexrelid WHERE i.indrelid = %s::regclass AND i.indisunique",
            [table],
        )
        return dict(cur.fetchall())


def test_a_mailing_carries_its_messages_school_and_one_per_message(school, other_school):
    slip = factories.make_slip(school=school)
    broadcast = factories.make_broadcast(school=school)
    factories.make_mailing(slip)
    factories.make_mailing(broadcast)

    def mailing(source, owner, round_: int = 0) -> None:
        factories.make_mailing(source, school=owner, round=round_)

    # Another school's mailing of this school's message.
    assert _refused(lambda: mailing(slip, other_school, round_=1))
    assert _refused(lambda: mailing(broadcast, other_school))
    # A second mailing of the same message (round), whatever school it claims.
    assert _refused(lambda: mailing(slip, school))
    assert _refused(lambda: mailing(broadcast, school))
    mailing(slip, school, round_=1)  # the next round is another mailing
    assert Mailing.objects.count() == 3


GUARDS_0013 = {"mailing_one_per_school_slip_round", "mailing_one_per_school_broadcast"}
OLD_GUARDS = {"mailing_one_per_slip_round", "mailing_one_per_broadcast"}


def test_0013_goes_back_and_forth_with_a_guard_at_every_step(school):
    migration = importlib.import_module("notifications.migrations.0013_school_in_mailing_keys")
    slip = factories.make_slip(school=school)
    factories.make_mailing(slip)
    keys = {"mailing_slip_same_school", "mailing_broadcast_same_school"}
    assert keys <= _constraints()
    assert set(_indexes("notifications_mailing")) >= GUARDS_0013
    assert not OLD_GUARDS & set(_indexes("notifications_mailing"))
    with connection.schema_editor(atomic=False) as editor:
        migration.backwards(None, editor)
    try:
        indexes = _indexes("notifications_mailing")
        assert set(indexes) >= OLD_GUARDS and not GUARDS_0013 & set(indexes)
        assert not keys & _constraints()
        assert _refused(lambda: factories.make_mailing(slip))  # the old guard holds meanwhile
    finally:
        with connection.schema_editor(atomic=False) as editor:
            migration.forwards(None, editor)
    indexes = _indexes("notifications_mailing")
    assert set(indexes) >= GUARDS_0013 and not OLD_GUARDS & set(indexes)
    assert all(indexes.values())
    assert keys <= _constraints()


def test_a_claim_naming_another_school_neither_starts_nor_records(
    school, other_school, redis_client
):
    mailing_id = _broadcast(school, families=1)
    [claim] = transitions.deliveries_claim(limit=1, mailing_id=mailing_id)
    assert claim.school_id == school.pk
    elsewhere = dataclasses.replace(claim, school_id=other_school.pk)
    assert not transitions.delivery_start(claimed=elsewhere)
    assert Delivery.objects.get(pk=claim.id).status == S.CLAIMED
    assert transitions.delivery_start(claimed=claim)
    accepted = SendResult(Outcome.ACCEPTED, "", "q1")
    assert transitions.delivery_record(claimed=elsewhere, result=accepted) is None
    refused = SendResult(Outcome.FAILED, "550 no")
    assert transitions.delivery_record(claimed=elsewhere, result=refused) is None
    assert Delivery.objects.get(pk=claim.id).status == S.SUBMITTING
    assert transitions.delivery_record(claimed=claim, result=accepted) == S.SENT
