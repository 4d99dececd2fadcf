"""compose: the one place an email is composed, and the switch that turns its fast path off."""

from __future__ import annotations

import email
import re

import pytest
from django.core.mail import EmailMultiAlternatives

from notifications import compose, transitions
from notifications.mailer import RawEmail
from notifications.stencil import reference_bytes
from tests import factories

pytestmark = pytest.mark.django_db


def _one_claim(school):
    factories.broadcast_dispatched(school=school, families=1)
    [claim] = transitions.deliveries_claim(limit=1)
    return claim


def test_stencil_is_the_fast_path_for_a_raw_backend(school, settings):
    settings.EDSMART_EMAIL_STENCILS = True
    claim = _one_claim(school)
    composer = compose.Composer([claim])
    raw = composer.email_for(claim, raw_ok=True)
    assert isinstance(raw, RawEmail) and raw.to_addr == claim.email
    # A backend that cannot take bytes (an API) always gets the full rendering.
    assert isinstance(composer.email_for(claim, raw_ok=False), EmailMultiAlternatives)


def test_turning_stencils_off_renders_every_email_in_full_with_the_same_bytes(school, settings):
    settings.EDSMART_EMAIL_STENCILS = True
    claim = _one_claim(school)
    composer = compose.Composer([claim])
    fast = composer.email_for(claim, raw_ok=True)
    settings.EDSMART_EMAIL_STENCILS = False
    slow = composer.email_for(claim, raw_ok=True)
    assert isinstance(slow, EmailMultiAlternatives)
    # The same email either way: the full rendering with the stencil's date and link (both
    # depend on the clock) and MIME boundary is the stencil's payload, byte for byte.
    stamped = email.message_from_bytes(fast.payload)
    link = re.search(rb"http://[^\s\"]+/p/[^/\s]+/", fast.payload).group().decode()
    expected = reference_bytes(composer.inputs(claim), date=stamped["Date"], link=link)
    assert fast.payload == expected
    assert slow.message()["Message-ID"] == stamped["Message-ID"]
    assert slow.subject == stamped["Subject"]
