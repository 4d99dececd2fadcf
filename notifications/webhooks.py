"""The mail provider's tracking events: suppress bounced and complaining addresses everywhere,
and record each event on its delivery (``provider_events``, which also settles ``unknown``
deliveries by the provider's word).

Two endpoints, both anymail views feeding anymail's normalized ``tracking`` signal (so what
happens after the view is the same for every provider): Mailgun's, below, and Postmark's
(``/webhooks/anymail/postmark/tracking/``, at the end of this module). Postmark signs nothing,
so its endpoint does not exist (404, and an error logged) until basic auth
(``ANYMAIL["WEBHOOK_SECRET"]``) is configured, whatever DEBUG says; a request without the right
credentials is a 400, and so is a body that is not a JSON object of Postmark's shape (a field
anymail looks up that is not a string, Metadata that is not an object, an implausible address,
a date that does not parse, an inbound event). Postmark retries anything but a 200; each event
is recorded once (``provider_events``), and suppression is idempotent.

Mailgun's tracking webhook (through django-anymail) is wired at
``/webhooks/anymail/mailgun/tracking/``. Mailgun signs only a timestamp and a random token
(HMAC-SHA256 with ``ANYMAIL["MAILGUN_WEBHOOK_SIGNING_KEY"]``), never the event itself, so a
signature proves little on its own: a captured request could be replayed, with any recipient
in its event, for ever. Before an event reaches the suppression below, every request must pass,
in this order (any failure is a 4xx and nothing is suppressed):

1. The endpoint exists at all: without a signing key it answers 404; with DEBUG off it also
   answers 404, and logs an error, until ``ANYMAIL["WEBHOOK_SECRET"]`` (HTTP basic auth,
   ``user:password`` in the URL Mailgun calls) is set. With DEBUG on, basic auth stays optional
   so a developer can post signed events by hand.
2. Basic auth, when configured (anymail's check): 400.
3. A well-formed body: JSON only (Mailgun's pre-2018 form-encoded "legacy" webhooks are
   refused), an object with a ``signature`` block whose ``timestamp`` is whole seconds, whose
   ``token`` is printable ASCII and whose ``signature`` is 64 hex digits: 400 otherwise.
4. The HMAC signature (anymail's check): 400.
5. A fresh timestamp: at most ``MAX_AGE_SECONDS`` (5 minutes) old and at most
   ``MAX_FUTURE_SECONDS`` ahead of our clock: 400 otherwise. Servers need NTP.
6. A readable event: an ``event-data`` object with a string ``event``, a string (or absent)
   ``recipient``, and whatever else anymail's parser can read without an exception: 400.
7. A token never seen before: ``SET edsmart:webhook:mailgun:token:<token> NX EX``
   (``TOKEN_TTL_SECONDS``, far longer than the 6-minute span in which a timestamp is accepted,
   so a token cannot outlive its memory). A token seen before is a replay: 400.

If handling a fresh event then fails (the database is away, say) the token is forgotten again
and the error is a 500, so a redelivery of that same signed request is not taken for a replay
(while its timestamp is still fresh).

Redis unreachable: the request is refused with 503 and an error is logged. A replay guard that
waved requests through whenever Redis was away would reopen the replay hole exactly when an
attacker could arrange it, so it fails closed. Mailgun retries anything but 200 and 406, but its
first retry comes 10 minutes later and (as far as is known; Mailgun does not document it)
carries the original signature, which step 5 then refuses: an event refused with 503 (or 500)
is in practice lost. That costs little here: Mailgun itself stops delivering to an address that
hard-bounced or complained, and a later mail to a hard-bounced address comes back as a
permanent failure (reason ``suppress-bounce``), which suppresses it here.

A guardian row belongs to one school, but an address is one mailbox: a hard bounce or a
complaint means nobody should mail it again, so every guardian with that normalized address,
in every school, is suppressed. The fan-out then records them as ``skipped`` with the reason.
Staff reactivate an address by clearing ``suppressed_at`` on the guardian, or a school admin
for their school from its bounce log (``admin_bounces``). Only permanent bounces suppress:
Mailgun's temporary failures (anymail: deferred), its permanent failures for reasons other than
a bounce, and Postmark's soft bounces (which anymail reports with the same reject reason as a
hard one; the raw ``Type`` tells them apart) do not.

After suppression, ``on_tracking`` records the event (``provider_events.event_record``): an
error there is raised like any other, so the view answers 500 and the provider retries.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

from anymail.exceptions import (
    AnymailConfigurationError,
    AnymailError,
    AnymailWebhookValidationFailure,
)
from anymail.signals import AnymailTrackingEvent, EventType, RejectReason, tracking
from anymail.utils import get_anymail_setting
from anymail.webhooks.base import AnymailBasicAuthMixin
from anymail.webhooks.mailgun import MailgunTrackingWebhookView
from anymail.webhooks.postmark import PostmarkTrackingWebhookView
from django.conf import settings
from django.dispatch import receiver
from django.http import Http404, HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from redis.exceptions import RedisError

from edsmart.redis_client import redis_client
from notifications import provider_events
from slips.models import Guardian, normalize_email

log = logging.getLogger("edsmart.webhooks")

# Permanent bounces only: a full mailbox or a greylisting server is not a reason to stop.
HARD_BOUNCE_REASONS = frozenset({RejectReason.BOUNCED, RejectReason.INVALID})
# Rejected by the provider itself because of an earlier bounce or complaint.
REJECT_REASONS = frozenset({RejectReason.BOUNCED, RejectReason.INVALID, RejectReason.SPAM})


def suppression_reason(event: AnymailTrackingEvent) -> str | None:
    """Why this event should stop mail to its recipient, or None if it should not."""
    kind = event.event_type
    if kind == EventType.COMPLAINED:
        return "complaint (marked as spam)"
    if (
        kind == EventType.BOUNCED
        and event.reject_reason in HARD_BOUNCE_REASONS
        and not provider_events.is_soft_bounce(event)
    ):
        return f"hard bounce: {event.description or event.mta_response or event.reject_reason}"
    if kind == EventType.REJECTED and event.reject_reason in REJECT_REASONS:
        return f"rejected by provider: {event.description or event.reject_reason}"
    return None


def guardians_suppress(*, email: str, reason: str) -> int:
    """Suppress every guardian with this address. The first reason is kept on redelivery."""
    normalized = normalize_email(email)
    if not normalized:
        return 0
    return Guardian.objects.filter(email_normalized=normalized, suppressed_at__isnull=True).update(
        suppressed_at=timezone.now(), suppressed_reason=reason[:200]
    )


@receiver(tracking, dispatch_uid="edsmart-suppress-on-bounce")
def on_tracking(
    sender: object, event: AnymailTrackingEvent, esp_name: str, **kwargs: object
) -> None:
    """Suppress the address if the event says so, then record the event on its delivery
    (which may settle an ``unknown`` one). Either failing raises: the view answers 500 and the
    provider retries; the suppression is idempotent and the recording happens once."""
    reason = suppression_reason(event)
    if reason is not None and event.recipient:
        reason = _storable(f"{reason} ({esp_name}, {timezone.now():%Y-%m-%d})")
        count = guardians_suppress(email=event.recipient, reason=reason)
        log.warning(
            "suppressed %s guardian(s) after %s",
            count,
            event.event_type,
            extra={"event_type": event.event_type, "provider_message_id": event.message_id},
        )
    provider_events.event_record(event=event, esp_name=esp_name)


def _storable(text: str) -> str:
    """Text PostgreSQL will take: no NUL characters and no lone surrogates (either is an
    exception in the driver, which would turn a provider's odd description into a 500)."""
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "")


# --- The Mailgun endpoint: configured, authenticated, well formed, signed, fresh, unseen ---

# A signed timestamp is accepted from MAX_AGE_SECONDS before our clock to MAX_FUTURE_SECONDS
# after it (clock skew); a token is remembered for TOKEN_TTL_SECONDS, well beyond that span.
MAX_AGE_SECONDS = 5 * 60
MAX_FUTURE_SECONDS = 60
TOKEN_TTL_SECONDS = 60 * 60
# Longest recipient looked up; real addresses stop at 254 characters.
MAX_RECIPIENT_CHARS = 1000

_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_TOKEN = re.compile(r"[!-~]{1,256}")  # printable ASCII, no spaces; Mailgun's are 50 hex digits
_SIGNATURE = re.compile(r"[0-9a-f]{64}")  # a hex SHA-256 HMAC

# What anymail's JSON parser raises on shapes it does not expect (a list where it wants an
# object, an unhashable event type, a timestamp of 1e400...). After our own checks these can
# only come from a signed but malformed event, which is the sender's error: a 400.
_PARSE_ERRORS = (
    AnymailError,
    ArithmeticError,
    AttributeError,
    LookupError,
    OSError,
    TypeError,
    ValueError,
)


class ReplayGuardUnavailable(Exception):
    """Redis could not say whether a token was seen before."""


def _refuse(message: str) -> AnymailWebhookValidationFailure:
    # A SuspiciousOperation: Django answers 400 and logs it on django.security.
    return AnymailWebhookValidationFailure(f"Mailgun webhook refused: {message}")


def _payload(request: HttpRequest) -> tuple[dict[str, Any], int, str]:
    """The JSON body, its signed timestamp and its token, or a 400 for anything else."""
    if request.content_type != "application/json":
        raise _refuse("not a JSON body (legacy form-encoded webhooks are not accepted)")
    try:
        payload = json.loads(request.body.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # bad UTF-8 or JSON, or absurdly deep nesting
        raise _refuse("body is not valid UTF-8 JSON") from err
    if not isinstance(payload, dict):
        raise _refuse("body is not a JSON object")
    signature = payload.get("signature")
    if not isinstance(signature, dict):
        raise _refuse("no signature block")
    timestamp, token, digest = (signature.get(k) for k in ("timestamp", "token", "signature"))
    if isinstance(timestamp, int) and not isinstance(timestamp, bool) and timestamp >= 0:
        timestamp = str(timestamp)
    if not (isinstance(timestamp, str) and _TIMESTAMP.fullmatch(timestamp)):
        raise _refuse("signature timestamp is not whole seconds")
    if not (isinstance(token, str) and _TOKEN.fullmatch(token)):
        raise _refuse("signature token is not printable ASCII")
    if not (isinstance(digest, str) and _SIGNATURE.fullmatch(digest)):
        raise _refuse("signature is not a hex HMAC-SHA256")
    if not isinstance(payload.get("event-data"), dict):
        raise _refuse("no event-data object")
    return payload, int(timestamp), token


def _check_fresh(timestamp: int) -> None:
    age = time.time() - timestamp
    if age > MAX_AGE_SECONDS or age < -MAX_FUTURE_SECONDS:
        log.warning(
            "Mailgun webhook refused: signed %+d s from now, outside -%d..+%d s "
            "(a replay, or a wrong clock)",
            -int(age),
            MAX_AGE_SECONDS,
            MAX_FUTURE_SECONDS,
            extra={"signed_at": timestamp},
        )
        raise _refuse("signature timestamp outside the accepted window")


def _clean_text(value: object) -> bool:
    if not isinstance(value, str) or "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, which JSON allows as \ud800
        return False
    return True


def _token_key(token: str) -> str:
    return f"edsmart:webhook:mailgun:token:{token}"


def _claim_token(token: str) -> bool:
    """True the first time this token is seen; ReplayGuardUnavailable if Redis is away."""
    try:
        return bool(redis_client().set(_token_key(token), 1, nx=True, ex=TOKEN_TTL_SECONDS))
    except RedisError as err:
        raise ReplayGuardUnavailable from err


def _forget_token(token: str) -> None:
    try:
        redis_client().delete(_token_key(token))
    except RedisError:
        log.exception("could not forget Mailgun webhook token after a failure")


class GuardedMailgunTrackingView(MailgunTrackingWebhookView):
    """Anymail's Mailgun tracking view, with the checks in the module docstring around it."""

    def post(self, request: HttpRequest, *args: object, **kwargs: object) -> HttpResponse:
        # Basic auth before anything else, so an unauthenticated caller learns nothing more.
        AnymailBasicAuthMixin.validate_request(self, request)
        payload, timestamp, token = _payload(request)
        self.run_validators(request)  # anymail: basic auth again, then the HMAC signature
        _check_fresh(timestamp)
        event = self._event(payload)
        try:
            fresh = _claim_token(token)
        except ReplayGuardUnavailable:
            log.exception("Mailgun webhook refused with 503: Redis (the replay guard) is away")
            return HttpResponse("replay guard unavailable", status=503, content_type="text/plain")
        if not fresh:
            log.warning(
                "Mailgun webhook refused: token already used (a replay)",
                extra={"event_type": event.event_type, "provider_message_id": event.message_id},
            )
            raise _refuse("token already used")
        try:
            self.signal.send(sender=self.__class__, event=event, esp_name=self.esp_name)
        except BaseException:
            _forget_token(token)  # let a redelivery of this same request be processed
            raise
        return HttpResponse()

    def _event(self, payload: dict[str, Any]) -> AnymailTrackingEvent:
        data = payload["event-data"]
        if not isinstance(data.get("event"), str):
            raise _refuse("event-data has no event type")
        for field in ("severity", "reason"):  # looked up in anymail's dicts: must be hashable
            if data.get(field) is not None and not isinstance(data[field], str):
                raise _refuse(f"event-data {field} is not a string")
        try:
            event = self.esp_to_anymail_event(payload)
        except _PARSE_ERRORS as err:
            raise _refuse("event-data could not be read") from err
        recipient = event.recipient
        if recipient is not None and not (
            _clean_text(recipient) and len(recipient) <= MAX_RECIPIENT_CHARS
        ):
            raise _refuse("event-data recipient is not a plausible address")
        return event


def _mailgun_configured() -> bool:
    for name in ("webhook_signing_key", "api_key"):
        try:
            if get_anymail_setting(name, esp_name="Mailgun", default=None, allow_bare=True):
                return True
        except AnymailConfigurationError:
            continue
    return False


def _basic_auth_configured() -> bool:
    secret = get_anymail_setting("webhook_secret", default=None)
    if isinstance(secret, str):
        return bool(secret)
    return bool(secret) and all(isinstance(s, str) and s for s in secret)


_mailgun_view = GuardedMailgunTrackingView.as_view()


@csrf_exempt
def mailgun_tracking(request: HttpRequest) -> HttpResponse:
    """The guarded Mailgun tracking view, refused outright until it is configured: a signing
    key always, and basic auth too unless DEBUG is on."""
    if not _mailgun_configured():
        raise Http404("webhook not configured")
    if not settings.DEBUG and not _basic_auth_configured():
        log.error(
            "Mailgun webhook refused (404): basic auth is required when DEBUG is off; "
            "set ANYMAIL['WEBHOOK_SECRET'] (env ANYMAIL_WEBHOOK_SECRET) to 'user:password' "
            "and put it in the webhook URL configured at Mailgun"
        )
        raise Http404("webhook not configured")
    return _mailgun_view(request)


# --- The Postmark endpoint: configured with basic auth, well formed -----------------------------


def _refuse_postmark(message: str) -> AnymailWebhookValidationFailure:
    return AnymailWebhookValidationFailure(f"Postmark webhook refused: {message}")


# Fields anymail's parser looks up in its tables or parses: strings (or absent) only.
_POSTMARK_TEXT_FIELDS = (
    "RecordType",
    "Type",
    "SuppressionReason",
    "MessageID",
    "DeliveredAt",
    "BouncedAt",
    "ReceivedAt",
    "ChangedAt",
)


class GuardedPostmarkTrackingView(PostmarkTrackingWebhookView):
    """Anymail's Postmark tracking view behind basic auth, refusing malformed bodies with 400.

    Postmark signs nothing: the basic auth credentials in the URL configured at Postmark are
    the only proof that a request comes from Postmark, so the endpoint does not exist without
    them (``postmark_tracking``). Postmark retries a request that is not answered 200, so a
    redelivered event is expected: ``provider_events`` records each once.
    """

    def post(self, request: HttpRequest, *args: object, **kwargs: object) -> HttpResponse:
        AnymailBasicAuthMixin.validate_request(self, request)
        if request.content_type != "application/json":
            raise _refuse_postmark("not a JSON body")
        try:
            payload = json.loads(request.body.decode("utf-8"))
        except (ValueError, RecursionError) as err:
            raise _refuse_postmark("body is not valid UTF-8 JSON") from err
        if not isinstance(payload, dict):
            raise _refuse_postmark("body is not a JSON object")
        self.run_validators(request)
        event = self._event(payload)
        self.signal.send(sender=self.__class__, event=event, esp_name=self.esp_name)
        return HttpResponse()

    def _event(self, payload: dict[str, Any]) -> AnymailTrackingEvent:
        for field in _POSTMARK_TEXT_FIELDS:
            if payload.get(field) is not None and not _clean_text(payload[field]):
                raise _refuse_postmark(f"{field} is not a string")
        if payload.get("Metadata") is not None and not isinstance(payload["Metadata"], dict):
            raise _refuse_postmark("Metadata is not an object")
        for field in ("Email", "Recipient"):
            value = payload.get(field)
            if value is not None and not (_clean_text(value) and len(value) <= MAX_RECIPIENT_CHARS):
                raise _refuse_postmark(f"{field} is not a plausible address")
        try:
            return self.esp_to_anymail_event(payload)
        except (*_PARSE_ERRORS, AnymailConfigurationError) as err:  # an inbound event, say
            raise _refuse_postmark("event could not be read") from err


_postmark_view = GuardedPostmarkTrackingView.as_view()


@csrf_exempt
def postmark_tracking(request: HttpRequest) -> HttpResponse:
    """The guarded Postmark tracking view, refused outright (404, and an error logged) until
    basic auth is configured, whatever DEBUG says: Postmark signs nothing, so without basic
    auth anyone could report bounces and settle deliveries."""
    if not _basic_auth_configured():
        log.error(
            "Postmark webhook refused (404): basic auth is required; set "
            "ANYMAIL['WEBHOOK_SECRET'] (env ANYMAIL_WEBHOOK_SECRET) to 'user:password' and put "
            "it in the webhook URL configured at Postmark"
        )
        raise Http404("webhook not configured")
    return _postmark_view(request)
