"""A mailing's email rendered and serialized once, then filled in per recipient.

The private fast path of ``compose``: nothing else should call it.

Why: rendering two templates and serializing MIME with Python's ``email`` package cost about
3 ms of CPU per email, more than the SMTP exchange and the database together, although all
but a few values are the same for every recipient of a mailing. A stencil is the serialized
email with markers where the recipient's address, Message-ID, delivery id, date, name,
children and link go; filling it in is a join of byte strings.

A stencil must produce exactly the bytes the templates and Django would. Three guards keep it
so: values that would serialize differently (an address that is not plain ASCII, line breaks,
a line over the RFC 5322 limit, which switches Django to quoted-printable) take the slow path;
each stencil's first email is compared byte for byte with the slow path (same date, same MIME
boundary), and a stencil that differs is dropped with an error logged, its mailing's emails
then rendered in full; and a
property test compares the two paths over arbitrary names, children and addresses.
"""

from __future__ import annotations

import logging
import re
import secrets
import smtplib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from email.utils import formatdate
from html import escape  # what Django's escape does, without its lazy-string wrapper

from django.conf import settings
from django.core.mail.message import sanitize_address

from notifications.mailer import RawEmail
from notifications.rendering import (
    EmailInputs,
    EmailParts,
    build_email,
    full_email,
    message_id_for,
    render_parts,
)
from slips.tokens import parent_link

log = logging.getLogger("edsmart.stencil")

# Django's limit (RFC 5322 section 2.1.1): a longer line makes it use quoted-printable.
MAX_LINE_BYTES = 998
# Addresses that appear byte for byte as themselves in the To header and in RCPT TO, and that
# are short enough never to be folded: a dot-atom local part and an ASCII host name.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_ADDRESS = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\Z")
_MAX_PLAIN_ADDRESS = 64
# str.splitlines() boundaries: any of them in a value changes how the body is serialized.
_LINE_BREAK = re.compile("[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")

# A per-process random token makes markers that no staff text or recipient value contains.
_TOKEN = secrets.token_hex(6)
_MARKER = re.compile(rb"edsm" + _TOKEN.encode() + rb"([a-z]+)x(?:@slot\.invalid)?")
_BOUNDARY = f"==============={_TOKEN}=="


def _marker(slot: str) -> str:
    return f"edsm{_TOKEN}{slot}x"


def _address_marker() -> str:
    return f"{_marker('to')}@slot.invalid"


def _plain_address(address: str) -> bool:
    return len(address) <= _MAX_PLAIN_ADDRESS and bool(_PLAIN_ADDRESS.match(address))


@dataclass
class Stencil:
    """One variant of one mailing's email: literal byte segments with slot names between."""

    segments: list[bytes]
    slots: list[str]
    from_addr: str
    text_8bit: bool
    html_8bit: bool
    verified: bool = False

    def fill(self, values: dict[str, bytes]) -> bytes:
        out = [self.segments[0]]
        for slot, segment in zip(self.slots, self.segments[1:], strict=True):
            out.append(values[slot])
            out.append(segment)
        return b"".join(out)


class StencilBook:
    """Stencils built on first use, one per mailing, sender and template variant.

    The variant is what the templates branch on besides the slots themselves: whether the
    recipient has a name (``default`` filter) and whether children are listed (``if``). The
    key holds everything else a stencil is made from (the mailing's frozen subject and body,
    the sender), so a changed school name makes a new stencil rather than reusing a stale one.
    At most ``size`` are kept, the least recently used dropped first.
    """

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self.stencils: OrderedDict[tuple, Stencil | None] = OrderedDict()
        self._lock = threading.Lock()  # a process-wide book may be shared by threads

    @staticmethod
    def _key(inputs: EmailInputs) -> tuple:
        m = inputs.mailing
        variant = (bool(inputs.recipient_name), bool(inputs.children))
        return (
            m.pk,
            m.kind,
            m.subject,
            m.body,
            inputs.school_name,
            inputs.from_email,
            inputs.reply_to,
            variant,
        )

    def _stencil(self, inputs: EmailInputs) -> Stencil | None:
        key = self._key(inputs)
        with self._lock:
            if key in self.stencils:
                self.stencils.move_to_end(key)
                return self.stencils[key]
        stencil = _build(inputs)
        with self._lock:
            self.stencils[key] = stencil
            while len(self.stencils) > self.size:
                self.stencils.popitem(last=False)
        return stencil

    def _drop(self, inputs: EmailInputs) -> None:
        key = self._key(inputs)
        with self._lock:
            if key in self.stencils:
                self.stencils[key] = None

    def email_for(self, inputs: EmailInputs) -> RawEmail | None:
        """The serialized email, or None when this recipient needs the slow path."""
        mailing, to, recipient_name, children = (
            inputs.mailing,
            inputs.to,
            inputs.recipient_name,
            inputs.children,
        )
        values = [recipient_name, *children]
        # _TOKEN is in every marker and in the MIME boundary, so no value may hold it.
        if not _plain_address(to) or any(_LINE_BREAK.search(v) or _TOKEN in v for v in values):
            return None
        stencil = self._stencil(inputs)
        if stencil is None:
            return None
        date = formatdate(localtime=settings.EMAIL_USE_LOCALTIME)
        delivery_id = inputs.delivery_id
        link = parent_link(delivery_id=delivery_id)
        kids = ", ".join(children)
        non_ascii = not (recipient_name.isascii() and kids.isascii())
        filled = stencil.fill(
            {
                "to": to.encode(),
                "mid": message_id_for(delivery_id).encode(),
                "did": str(delivery_id).encode(),
                "date": date.encode(),
                "tcte": b"8bit" if stencil.text_8bit or non_ascii else b"7bit",
                "hcte": b"8bit" if stencil.html_8bit or non_ascii else b"7bit",
                "tname": recipient_name.encode(),
                "hname": escape(recipient_name).encode(),
                "tkids": kids.encode(),
                "hkids": escape(kids).encode(),
                "tlink": link.encode(),
                "hlink": escape(link).encode(),
            }
        )
        if max(map(len, filled.split(b"\r\n"))) > MAX_LINE_BYTES:
            return None
        if not stencil.verified:
            if filled != reference_bytes(inputs, date=date, link=link):
                log.error(
                    "email stencil for mailing %s differs from its templates; "
                    "its emails are rendered in full",
                    mailing.pk,
                    extra={"mailing_id": mailing.pk},
                )
                self._drop(inputs)
                return None
            stencil.verified = True
        return RawEmail(from_addr=stencil.from_addr, to_addr=to, payload=filled)


def reference_bytes(inputs: EmailInputs, *, date: str, link: str) -> bytes:
    """The slow path's bytes with the given date, link (signed links carry a timestamp) and
    the stencils' boundary, for comparison."""
    msg = full_email(inputs, date=date, link=link).message()
    msg.set_boundary(_BOUNDARY)
    return msg.as_bytes(linesep="\r\n")


def _build(inputs: EmailInputs) -> Stencil | None:
    has_name, has_children = bool(inputs.recipient_name), bool(inputs.children)

    def marked(prefix: str) -> EmailParts:
        return render_parts(
            mailing=inputs.mailing,
            school_name=inputs.school_name,
            delivery_id=0,
            recipient_name=_marker(f"{prefix}name") if has_name else "",
            children=[_marker(f"{prefix}kids")] if has_children else [],
            link=_marker(f"{prefix}link"),
        )

    # The text part comes from a rendering with text markers, the HTML part from one with
    # HTML markers, so each slot knows which escaping its value needs.
    text, html = marked("t"), marked("h")
    email = build_email(
        delivery_id=0,
        to=_address_marker(),
        from_email=inputs.from_email,
        reply_to=inputs.reply_to,
        parts=EmailParts(subject=text.subject, text=text.text, html=html.html),
        date=_marker("date"),
        message_id=_marker("mid"),
        delivery_header=_marker("did"),
    )
    msg = email.message()
    msg.set_boundary(_BOUNDARY)
    text_part, html_part = msg.get_payload()
    encodings = []
    for part, slot in ((text_part, "tcte"), (html_part, "hcte")):
        cte = part["Content-Transfer-Encoding"]
        if cte not in ("7bit", "8bit"):
            return None  # quoted-printable: filling in would need re-encoding
        encodings.append(cte == "8bit")
        part.replace_header("Content-Transfer-Encoding", _marker(slot))
    pieces = _MARKER.split(msg.as_bytes(linesep="\r\n"))
    return Stencil(
        segments=pieces[0::2],
        slots=[p.decode() for p in pieces[1::2]],
        # The envelope sender: the bare address, as smtplib would put it in MAIL FROM.
        from_addr=smtplib.quoteaddr(sanitize_address(inputs.from_email, settings.DEFAULT_CHARSET))[
            1:-1
        ],
        text_8bit=encodings[0],
        html_8bit=encodings[1],
    )
