import pytest
from django.db import IntegrityError

from slips.audiences import audience_recipients
from tests import factories


@pytest.mark.django_db
def test_shared_address_is_one_recipient_naming_both_children(school):
    kids = [factories.make_student(school=school) for _ in range(2)]
    factories.make_guardian(school=school, students=kids[:1], email="Family@Example.net")
    factories.make_guardian(school=school, students=kids[1:], email="family@example.net ")
    recipients = audience_recipients(factories.make_audience(school=school))
    assert len(recipients) == 1
    assert sorted(recipients[0].student_ids) == sorted(k.pk for k in kids)


@pytest.mark.django_db
def test_external_id_unique_per_school(school, other_school):
    factories.make_student(school=school, external_id="A1")
    factories.make_student(school=other_school, external_id="A1")
    with pytest.raises(IntegrityError):
        factories.make_student(school=school, external_id="A1")


def _violates(fn) -> bool:
    from django.db import transaction

    try:
        with transaction.atomic():
            fn()
    except IntegrityError:
        return True
    return False


@pytest.mark.django_db
def test_membership_is_unique_per_user_and_school(school, other_school):
    from slips.models import Membership

    user = factories.make_staff(school=school)
    assert _violates(lambda: Membership.objects.create(user=user, school=school))
    Membership.objects.create(user=user, school=other_school)  # several schools are fine


@pytest.mark.django_db
def test_group_names_are_unique_per_school_ignoring_case(school, other_school):
    factories.make_group(school=school, name="3B")
    assert _violates(lambda: factories.make_group(school=school, name="3b"))
    factories.make_group(school=other_school, name="3B")


@pytest.mark.django_db
def test_one_response_per_slip_and_student(school):
    from django.utils import timezone

    from slips.models import Response

    kid = factories.make_student(school=school)
    slip = factories.make_slip(school=school)
    fields = {"school": school, "slip": slip, "student": kid, "answered_at": timezone.now()}
    Response.objects.create(consent=True, **fields)
    assert _violates(lambda: Response.objects.create(consent=False, **fields))


@pytest.mark.django_db
def test_one_mailing_per_slip_round_and_per_broadcast(school):
    from notifications.models import Mailing

    slip = factories.make_slip(school=school)
    broadcast = factories.make_broadcast(school=school)
    common = {"school": school, "subject": "s", "body": "b"}
    Mailing.objects.create(kind="slip", slip=slip, round=0, **common)
    assert _violates(lambda: Mailing.objects.create(kind="slip", slip=slip, round=0, **common))
    Mailing.objects.create(kind="reminder", slip=slip, round=1, **common)
    Mailing.objects.create(kind="broadcast", broadcast=broadcast, **common)
    assert _violates(
        lambda: Mailing.objects.create(kind="broadcast", broadcast=broadcast, **common)
    )
    # A mailing's kind must match what it points at.
    assert _violates(lambda: Mailing.objects.create(kind="broadcast", slip=slip, round=5, **common))


@pytest.mark.django_db
def test_one_delivery_per_mailing_and_normalized_address(school):
    from notifications.models import Delivery, Mailing

    broadcast = factories.make_broadcast(school=school)
    mailing = Mailing.objects.create(
        school=school, kind="broadcast", broadcast=broadcast, subject="s", body="b"
    )
    row = {"mailing": mailing, "school": school, "email_normalized": "a@example.org"}
    Delivery.objects.create(email="a@example.org", **row)
    assert _violates(lambda: Delivery.objects.create(email="A@Example.org", **row))


@pytest.mark.django_db
def test_one_open_alert_per_condition(school):
    from django.utils import timezone

    from notifications.models import Alert

    Alert.objects.create(key="backlog", kind="backlog", severity="warning", message="old")
    assert _violates(
        lambda: Alert.objects.create(key="backlog", kind="backlog", severity="warning", message="x")
    )
    Alert.objects.filter(key="backlog").update(cleared_at=timezone.now())
    Alert.objects.create(key="backlog", kind="backlog", severity="warning", message="again")
