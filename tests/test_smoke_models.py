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
