"""A slip's or broadcast's email before it goes out: the preview, and the test sent to staff.

Both are the pipeline's own email for one family of the audience: the mailing the dispatcher
would create (content as it stands now, unsaved), gathered by ``compose.Composer`` and
rendered by ``rendering`` exactly as a real delivery's email, with two differences that make
it safe:

- the link is not a parent's link (no delivery exists to sign one for) but the caller's
  preview of the answer page, which records nothing;
- the test copy goes to the staff member's own address only, with "[TEST]" before the
  subject and a Message-ID no delivery has. Nothing is written to the database: no Mailing,
  no Delivery, no event. The message's own send later fans out to everyone as if no test had
  been sent, and no count, summary or provider report can take the test for one of its sends.

The test goes through ``mailer.send_one`` over a fresh connection of the configured backend,
like a batch's send. It is limited per staff member (``TEST_SENDS_PER_WINDOW`` in
``TEST_WINDOW_SECONDS``, a counter in Redis), and refused while ops have paused all sending.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace

import redis
from django.conf import settings
from django.core.mail import EmailMultiAlternatives, get_connection
from django.utils import timezone

from edsmart.redis_client import redis_client
from notifications.compose import Composer
from notifications.mailer import Outcome, SendResult, send_one
from notifications.models import Mailing, SendingSwitch
from notifications.rendering import EmailInputs, EmailParts, build_email, render_parts
from slips.audiences import audience_sample_recipient
from slips.models import Broadcast, Slip

TEST_SENDS_PER_WINDOW = 5
TEST_WINDOW_SECONDS = 600
TEST_PREFIX = "[TEST] "

# What a preview shows when nobody in the audience receives email yet.
MADE_UP_NAME = "Sample Parent"
MADE_UP_CHILD = "Sample Child"


@dataclass(frozen=True)
class SampleFamily:
    """The family a preview is addressed to: one recipient of the audience as the fan-out
    would address it, or a made-up one (``made_up``) when the audience has nobody yet."""

    name: str
    email: str
    student_ids: list[int] = field(default_factory=list)
    made_up: bool = False


@dataclass(frozen=True)
class _Recipient:
    """What ``Composer`` reads of a delivery; id 0 is no delivery's."""

    id: int
    mailing_id: int
    email: str
    recipient_name: str
    student_ids: list[int]


class SendToSelfRefused(Exception):
    """A test send that is not allowed now; the message says why, in staff's words."""


def sample_family(source: Slip | Broadcast) -> SampleFamily:
    recipient = audience_sample_recipient(source.audience) if source.audience_id else None
    if recipient is None:
        return SampleFamily(name=MADE_UP_NAME, email="parent@example.org", made_up=True)
    return SampleFamily(
        name=recipient.name, email=recipient.email, student_ids=list(recipient.student_ids)
    )


def draft_mailing(source: Slip | Broadcast) -> Mailing:
    """The mailing ``dispatch`` would create for ``source`` now, not saved."""
    is_slip = isinstance(source, Slip)
    return Mailing(
        school=source.school,
        kind=Mailing.Kind.SLIP if is_slip else Mailing.Kind.BROADCAST,
        slip=source if is_slip else None,
        broadcast=None if is_slip else source,
        round=0,
        subject=source.title,
        body=source.body,
        urgent=getattr(source, "urgent", False),
        created_at=timezone.now(),
    )


def _composed(source: Slip | Broadcast, family: SampleFamily, *, to: str) -> EmailInputs:
    mailing = draft_mailing(source)
    mailing.pk = 0  # what ``Composer`` keys its mailings by; never saved
    recipient = _Recipient(
        id=0, mailing_id=0, email=to, recipient_name=family.name, student_ids=family.student_ids
    )
    inputs = Composer([recipient], known={0: mailing}).inputs(recipient)
    if family.made_up and mailing.kind != Mailing.Kind.BROADCAST:
        inputs = replace(inputs, children=[MADE_UP_CHILD])
    return inputs


def preview_parts(source: Slip | Broadcast, family: SampleFamily, *, link: str) -> EmailParts:
    """Subject, text and HTML of the email ``family`` would get, with ``link`` for theirs."""
    inputs = _composed(source, family, to=family.email)
    return render_parts(
        mailing=inputs.mailing,
        school_name=inputs.school_name,
        delivery_id=0,
        recipient_name=inputs.recipient_name,
        children=inputs.children,
        link=link,
    )


def self_copy_email(
    source: Slip | Broadcast, family: SampleFamily, *, to: str, link: str
) -> EmailMultiAlternatives:
    """The test copy: ``family``'s email, to ``to``, marked as a test in its subject."""
    inputs = _composed(source, family, to=to)
    parts = preview_parts(source, family, link=link)
    domain = settings.DEFAULT_FROM_EMAIL.rpartition("@")[2] or "edsmart.localhost"
    email = build_email(
        delivery_id=0,
        to=to,
        from_email=inputs.from_email,
        reply_to=inputs.reply_to,
        parts=replace(parts, subject=f"{TEST_PREFIX}{parts.subject}"),
        # Not ``edsmart.delivery.N``: a provider's report about the test must match no row.
        message_id=f"<edsmart.test.{uuid.uuid4().hex}@{domain}>",
    )
    # No delivery header either: nothing may take the test for one of the message's sends.
    email.extra_headers.pop("X-EdSmart-Delivery", None)
    email.message()  # a value no header can carry fails here, before anything is sent
    return email


def _take_test_slot(user_id: int) -> None:
    key = f"edsmart:test-send:{user_id}"
    try:
        pipe = redis_client().pipeline()  # MULTI/EXEC: the window starts with the first
        pipe.set(key, 0, ex=TEST_WINDOW_SECONDS, nx=True)
        pipe.incr(key)
        used = int(pipe.execute()[1])
    except redis.RedisError as exc:
        raise SendToSelfRefused(
            "Test sends are unavailable for a moment (their limit cannot be checked). "
            "Please try again shortly."
        ) from exc
    if used > TEST_SENDS_PER_WINDOW:
        minutes = TEST_WINDOW_SECONDS // 60
        raise SendToSelfRefused(
            f"You have sent {TEST_SENDS_PER_WINDOW} test emails in the last {minutes} minutes. "
            "Please wait a few minutes before sending another."
        )


def send_to_self(
    *, source: Slip | Broadcast, user_id: int, to: str, link: str
) -> tuple[SampleFamily, SendResult]:
    """Send the test copy of ``source`` to ``to`` (the staff member's own address) now.

    Raises SendToSelfRefused when there is no address, ops have paused all sending, or the
    user's limit is used up. Returns the family it was addressed as and the mail server's
    outcome; nothing is recorded about it but the rate-limit counter.
    """
    if not to:
        raise SendToSelfRefused(
            "Your account has no email address, so there is nowhere to send a test. "
            "Ask ops to add one to your login."
        )
    if SendingSwitch.objects.filter(pk=1, paused=True).exists():
        raise SendToSelfRefused("All sending is paused by ops at the moment, test emails too.")
    _take_test_slot(user_id)
    family = sample_family(source)
    email = self_copy_email(source, family, to=to, link=link)
    connection = get_connection(fail_silently=False)
    try:
        result = send_one(connection=connection, message=email)
    finally:
        connection.close()
    if result.interrupted_by is not None:
        raise result.interrupted_by
    return family, result


def outcome_words(result: SendResult) -> str:
    """What staff read after a test send."""
    if result.outcome is Outcome.ACCEPTED:
        return "accepted by the mail server"
    if result.outcome is Outcome.UNKNOWN:
        return f"not confirmed by the mail server ({result.detail})"
    return f"not sent: {result.detail}"
