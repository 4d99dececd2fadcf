"""The slow path of one email: its templates rendered and its message built in full.

``compose`` is the only caller outside the stencil: it decides between this and the stencil,
which is built from these same functions (with markers in place of the recipient's values)
so that both come out byte for byte the same.

Staff-written content is escaped in HTML (Django autoescape) and never interpreted; the
templates are the only markup.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from email.utils import formataddr, formatdate

from django.conf import settings
from django.core.mail import EmailMultiAlternatives
from django.template.loader import get_template

from notifications.models import Mailing
from slips.models import School
from slips.tokens import parent_link


@dataclass(frozen=True)
class EmailInputs:
    """Everything one delivery's email is made from."""

    mailing: Mailing
    school_name: str
    from_email: str
    reply_to: str
    delivery_id: int
    to: str
    recipient_name: str
    children: list[str]


@dataclass(frozen=True)
class EmailParts:
    subject: str
    text: str
    html: str


def sender_of(school: School) -> str:
    """The From header: the school's display name at the platform's sending address."""
    return formataddr((school.display_sender_name, settings.DEFAULT_FROM_EMAIL))


def message_id_for(delivery_id: int) -> str:
    """A Message-ID that is the same for every attempt of one delivery.

    Any resend carries the same id, so it is recognisable in the recipient's mailbox, at the
    provider and in our own logs as the same message rather than a new one.
    """
    domain = settings.DEFAULT_FROM_EMAIL.rpartition("@")[2] or "edsmart.localhost"
    return f"<edsmart.delivery.{delivery_id}@{domain}>"


def render_parts(
    *,
    mailing: Mailing,
    school_name: str,
    delivery_id: int,
    recipient_name: str,
    children: Iterable[str],
    link: str | None = None,
) -> EmailParts:
    """``link`` overrides the delivery's signed link (the stencils put a marker there)."""
    kind = "broadcast" if mailing.kind == Mailing.Kind.BROADCAST else "slip"
    context = {
        "mailing": mailing,
        "school_name": school_name,
        "recipient_name": recipient_name,
        "children": list(children),
        "link": parent_link(delivery_id=delivery_id) if link is None else link,
        "is_reminder": mailing.kind == Mailing.Kind.REMINDER,
    }
    subject = mailing.subject
    if context["is_reminder"]:
        subject = f"Reminder: {subject}"
    return EmailParts(
        subject=subject,
        text=get_template(f"notifications/email/{kind}.txt").render(context),
        html=get_template(f"notifications/email/{kind}.html").render(context),
    )


def build_email(
    *,
    delivery_id: int,
    to: str,
    from_email: str,
    reply_to: str,
    parts: EmailParts,
    date: str | None = None,
    message_id: str | None = None,
    delivery_header: str | None = None,
) -> EmailMultiAlternatives:
    """The email of one delivery. The keyword overrides exist for the stencils' markers."""
    email = EmailMultiAlternatives(
        subject=parts.subject,
        body=parts.text,
        from_email=from_email,
        to=[to],
        reply_to=[reply_to] if reply_to else None,
        headers={
            # Given here rather than left to Django, in the place Django would put it, so
            # that a stencil and a full rendering come out byte for byte the same.
            "Date": date or formatdate(localtime=settings.EMAIL_USE_LOCALTIME),
            "Message-ID": message_id or message_id_for(delivery_id),
            "X-EdSmart-Delivery": delivery_header or str(delivery_id),
            "Auto-Submitted": "auto-generated",
        },
    )
    email.attach_alternative(parts.html, "text/html")
    return email


def full_email(
    inputs: EmailInputs, *, date: str | None = None, link: str | None = None
) -> EmailMultiAlternatives:
    """The templates rendered and the message built for one recipient."""
    parts = render_parts(
        mailing=inputs.mailing,
        school_name=inputs.school_name,
        delivery_id=inputs.delivery_id,
        recipient_name=inputs.recipient_name,
        children=inputs.children,
        link=link,
    )
    return build_email(
        delivery_id=inputs.delivery_id,
        to=inputs.to,
        from_email=inputs.from_email,
        reply_to=inputs.reply_to,
        parts=parts,
        date=date,
    )
