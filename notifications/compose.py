"""The one place an email is composed: ``Composer.email_for`` for the deliveries of a batch.

It gathers what an email is made from (the mailing, its school as sender, the children's
names) once per batch, and chooses how to build it: filled in from the mailing's stencil
(``stencil``, the private fast path) when the backend takes raw bytes and the recipient's
values allow, rendered in full (``rendering``) otherwise. ``EDSMART_EMAIL_STENCILS=0`` turns
the fast path off; the bytes are the same either way, which the stencil checks itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from django.conf import settings
from django.core.mail import EmailMultiAlternatives

from notifications.mailer import RawEmail
from notifications.models import Mailing
from notifications.rendering import EmailInputs, full_email, sender_of
from notifications.stencil import StencilBook
from slips.models import Student

# Stencils outlive a batch: a large broadcast is sent in many batches by the same processes.
STENCILS = StencilBook()


class Recipient(Protocol):
    """What compose needs of one delivery (``transitions.Claimed`` has it)."""

    id: int
    mailing_id: int
    email: str
    recipient_name: str
    student_ids: list[int]


class Composer:
    """Composes the emails of one batch, loading what they share once."""

    def __init__(
        self, deliveries: Iterable[Recipient], *, known: dict[int, Mailing] | None = None
    ) -> None:
        """``known``: mailings loaded by earlier chunks of the same batch, reused and added
        to. A mailing's content is frozen at dispatch, so a batch need not read it again for
        every chunk (that was a tenth of a millisecond per email)."""
        deliveries = list(deliveries)
        known = {} if known is None else known
        missing = {d.mailing_id for d in deliveries} - known.keys()
        if missing:
            known.update(
                (m.pk, m) for m in Mailing.objects.select_related("school").filter(pk__in=missing)
            )
        self.mailings = known
        # Only slips name the children; a broadcast's rows need no student lookup.
        student_ids = {
            sid
            for d in deliveries
            if d.mailing_id in known and known[d.mailing_id].kind != Mailing.Kind.BROADCAST
            for sid in (d.student_ids or [])
        }
        self.students = (
            {
                s["pk"]: f"{s['first_name']} {s['last_name']}"
                for s in Student.objects.filter(pk__in=student_ids).values(
                    "pk", "first_name", "last_name"
                )
            }
            if student_ids
            else {}
        )
        self.senders = {
            m.pk: {
                "school_name": m.school.display_sender_name,
                "from_email": sender_of(m.school),
                "reply_to": m.school.sender_email,
            }
            for m in known.values()
        }

    def school_id(self, delivery: Recipient) -> int:
        return self.mailings[delivery.mailing_id].school_id

    def inputs(self, delivery: Recipient) -> EmailInputs:
        mailing = self.mailings[delivery.mailing_id]
        children = [] if mailing.kind == Mailing.Kind.BROADCAST else delivery.student_ids or []
        return EmailInputs(
            mailing=mailing,
            **self.senders[delivery.mailing_id],
            delivery_id=delivery.id,
            to=delivery.email,
            recipient_name=delivery.recipient_name,
            children=[self.students[s] for s in children if s in self.students],
        )

    def email_for(self, delivery: Recipient, *, raw_ok: bool) -> EmailMultiAlternatives | RawEmail:
        """The email to send. ``raw_ok``: the backend can send serialized bytes (SMTP).

        Raises whatever stops the email being built; the batch then fails this delivery
        alone, with the reason.
        """
        inputs = self.inputs(delivery)
        if raw_ok and settings.EDSMART_EMAIL_STENCILS:
            raw = STENCILS.email_for(inputs)
            if raw is not None:
                return raw
        email = full_email(inputs)
        # Build the MIME message now: a value no header can carry (a line break in a name)
        # must fail here, before the delivery is started, not inside the send.
        email.message()
        return email
