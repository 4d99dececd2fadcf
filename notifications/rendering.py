"""Render the text and HTML parts of one delivery's email from templates.

Staff-written content is escaped in HTML (Django autoescape) and never interpreted; the
templates are the only markup.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.template.loader import get_template

from notifications.mailer import EmailParts
from notifications.models import Mailing
from slips.links import parent_link


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
