"""The stencil path must send exactly the bytes the templates and Django would.

The property test warms each stencil up with an ordinary recipient (that first email is
checked against the slow path inside the stencil itself), then fills it for an arbitrary one
and compares with the slow path here, so a stencil that is only right for ordinary values
cannot pass.
"""

from __future__ import annotations

import email
import logging
import re
from email.utils import formataddr

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from notifications import stencil as stencil_module
from notifications.models import Mailing
from notifications.rendering import EmailInputs, full_email
from notifications.stencil import MAX_LINE_BYTES, StencilBook, reference_bytes

FROM = "noreply@edsmart.localhost"

any_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
names = any_text | st.sampled_from(
    ["", "N" * 990, "Ann O'Neil & <Bob>", 'Zoë "Zee" Müller', "李小龍", "=" * 20, ".dot"]
)
addresses = st.emails() | st.sampled_from(
    ["parent@example.org", "a.b+c@sub.example.org", "parent@bücher.example", "x" * 70 + "@e.org"]
)
bodies = st.text(max_size=400) | st.sampled_from(
    ["Line one\n\nLine two & <b>three</b>", "x" * (MAX_LINE_BYTES + 5), "From the head\n.dot"]
)
school_names = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=40)


def _inputs(mailing, school, delivery_id, to, name, children) -> EmailInputs:
    return EmailInputs(
        mailing=mailing,
        school_name=school,
        from_email=formataddr((school, FROM)),
        reply_to="office@school.example",
        delivery_id=delivery_id,
        to=to,
        recipient_name=name,
        children=children,
    )


def _stamps(payload: bytes) -> dict:
    """The date and signed link a filled stencil carries (both depend on the clock)."""
    link = re.search(rb"http://[^\s\"]+/p/[^/\s]+/", payload).group().decode()
    return {"date": email.message_from_bytes(payload)["Date"], "link": link}


@pytest.mark.parametrize("kind", [k for k, _ in Mailing.Kind.choices])
@hypothesis_settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=bodies,
    school=school_names,
    to=addresses,
    name=names,
    children=st.lists(names, max_size=3),
    delivery_id=st.integers(min_value=1, max_value=2**62),
)
def test_stencil_bytes_equal_the_full_rendering(
    kind, body, school, to, name, children, delivery_id
):
    mailing = Mailing(pk=7, kind=kind, subject="Trip to the zoo ü", body=body)
    book = StencilBook()
    warm_up = _inputs(
        mailing, school, 1, "first@example.org", "Ann" if name else "", ["Kid"] if children else []
    )
    first = book.email_for(warm_up)
    long_body = any(len(line.encode()) > MAX_LINE_BYTES for line in body.splitlines())
    if long_body:
        assert first is None  # quoted-printable: the slow path takes every email
    else:
        assert first is not None
    effective_children = [] if kind == Mailing.Kind.BROADCAST else children
    inputs = _inputs(mailing, school, delivery_id, to, name, effective_children)
    filled = book.email_for(inputs)
    if filled is None:
        full_email(inputs).message().as_bytes()  # the slow path copes with these values
        return
    assert filled.to_addr == to
    assert filled.payload == reference_bytes(inputs, **_stamps(filled.payload))


def test_ordinary_recipients_take_the_stencil_path():
    mailing = Mailing(pk=8, kind=Mailing.Kind.SLIP, subject="Excursion", body="Dear families,\n")
    book = StencilBook()
    for i, (name, kids) in enumerate([("Ann Lee", ["Tom Lee"]), ("Zoë Müller", ["Åsa", "Bo"])]):
        inputs = _inputs(mailing, "École du Parc", 10 + i, f"p{i}@example.org", name, kids)
        filled = book.email_for(inputs)
        assert filled is not None
        assert (filled.from_addr, filled.to_addr) == (FROM, f"p{i}@example.org")
        assert filled.payload == reference_bytes(inputs, **_stamps(filled.payload))
        parsed = email.message_from_bytes(filled.payload)
        text, html = (p.get_payload(decode=True).decode() for p in parsed.get_payload())
        assert name in text and ", ".join(kids) in text and name in html
        assert parsed["Message-ID"] == f"<edsmart.delivery.{10 + i}@edsmart.localhost>"


def test_a_stencil_that_differs_from_its_templates_is_dropped(monkeypatch, caplog):
    """A template doing something with a value the slots cannot reproduce (here: upper-casing
    the recipient's name) must never reach a parent: the check on the first email catches it
    and the batch renders every email in full."""
    real = stencil_module.render_parts

    def shouting(**kwargs):
        parts = real(**kwargs)
        return type(parts)(subject=parts.subject, text=parts.text.upper(), html=parts.html)

    monkeypatch.setattr(stencil_module, "render_parts", shouting)
    mailing = Mailing(pk=9, kind=Mailing.Kind.BROADCAST, subject="News", body="Hello")
    book = StencilBook()
    with caplog.at_level(logging.ERROR, logger="edsmart.stencil"):
        for i in range(2):
            inputs = _inputs(mailing, "School", 20 + i, f"p{i}@example.org", "Ann", [])
            assert book.email_for(inputs) is None
    assert [r.getMessage() for r in caplog.records] == [
        "email stencil for mailing 9 differs from its templates; its emails are rendered in full"
    ]


def test_stencils_follow_a_changed_sender_and_are_bounded():
    mailing = Mailing(pk=10, kind=Mailing.Kind.BROADCAST, subject="News", body="Hello")
    book = StencilBook(size=2)
    first = book.email_for(_inputs(mailing, "Old Name", 30, "p@example.org", "Ann", []))
    renamed = book.email_for(_inputs(mailing, "New Name", 31, "p@example.org", "Ann", []))
    assert email.message_from_bytes(first.payload)["From"] == f"Old Name <{FROM}>"
    assert email.message_from_bytes(renamed.payload)["From"] == f"New Name <{FROM}>"
    other = Mailing(pk=11, kind=Mailing.Kind.BROADCAST, subject="More", body="Hi")
    assert book.email_for(_inputs(other, "New Name", 32, "p@example.org", "Ann", []))
    assert len(book.stencils) == 2
    assert [key[0] for key in book.stencils] == [10, 11]  # the oldest ("Old Name") went first
