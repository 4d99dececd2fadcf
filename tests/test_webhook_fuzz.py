"""The Mailgun and Postmark webhooks answer 4xx, never 5xx, for any malformed input.

Hypothesis throws arbitrary bytes, arbitrary JSON values, and JSON objects with arbitrary,
missing and mistyped fields at the real endpoint through Django's test client, with real
PostgreSQL and Redis: unsigned, with a wrong or non-ASCII token, and correctly signed but
malformed (signed events that do parse go all the way to the suppression query). Any
exception in the view would be re-raised by the test client; any 5xx fails the assertion.
"""

from __future__ import annotations

import base64
import json
import logging
import time

import pytest
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from tests import factories
from tests.test_webhooks import BASIC, SIGNING_KEY, post_body, signed

pytestmark = pytest.mark.django_db

FUZZ = hypothesis_settings(
    max_examples=100,
    deadline=None,
    database=None,  # nothing written into the shared tree
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # the client and settings are the same each time
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

# Text with what breaks naive code: NUL, control characters, lone surrogates, non-ASCII.
odd_chars = st.one_of(
    st.characters(),
    st.sampled_from(["\x00", "\n", "\r", "\u2028", "é", "€", "\U0001f4e7", "@", '"', "\\"]),
    st.integers(0xD800, 0xDFFF).map(chr),
)
odd_text = st.text(odd_chars, max_size=40)
# Long strings in fields (a bounce description of a megabyte, say); whole bodies past
# Django's 2.5 MB limit (its own 400) are thrown in test_arbitrary_bytes.
huge_text = st.builds(
    lambda c, n: c * n,
    st.sampled_from(["a", "é", "\x00", "\ud800"]),
    st.sampled_from([1_000, 100_000]),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(),  # NaN and the infinities too: json.dumps writes them, json.loads reads them
    odd_text,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text, inner, max_size=4),
    max_leaves=12,
)
maybe_huge = st.one_of(json_values, json_values, json_values, huge_text)  # huge a quarter

EVENT_FIELDS = [
    "event",
    "recipient",
    "timestamp",
    "id",
    "severity",
    "reason",
    "message",
    "delivery-status",
    "user-variables",
    "tags",
    "reject",
    "url",
    "client-info",
]
plausible = {
    "event": st.sampled_from(
        ["failed", "complained", "rejected", "delivered", "opened", "clicked", "accepted"]
    ),
    "recipient": st.sampled_from(["gone@example.org", " GONE@example.org ", "", "x@y"]),
    "severity": st.sampled_from(["permanent", "temporary"]),
    "reason": st.sampled_from(["bounce", "suppress-bounce", "generic", "other"]),
    "timestamp": st.floats(0, 2e9) | st.sampled_from(["1529006854", "soon"]),
    "message": st.fixed_dictionaries(
        {}, optional={"headers": st.dictionaries(st.sampled_from(["message-id", "to"]), odd_text)}
    ),
    "delivery-status": st.fixed_dictionaries(
        {}, optional={"description": maybe_huge, "message": maybe_huge, "code": json_values}
    ),
}


@st.composite
def event_object(draw, fields: list[str], plausible_values: dict) -> dict:
    """An event object: each known field absent, plausible or anything at all, plus extras."""
    data = {}
    for field in fields:
        choice = draw(st.sampled_from(["absent", "plausible", "plausible", "anything"]))
        if choice == "plausible" and field in plausible_values:
            data[field] = draw(plausible_values[field])
        elif choice != "absent":
            data[field] = draw(maybe_huge)
    data.update(draw(st.dictionaries(odd_text, json_values, max_size=3)))
    return data


def event_data() -> st.SearchStrategy[dict]:
    """A Mailgun event object."""
    return event_object(EVENT_FIELDS, plausible)


now = int(time.time())
timestamps = st.one_of(
    st.just(None),  # now, as Mailgun would
    st.integers(now - 400, now + 400).map(str),  # either side of the window
    st.integers(now - 400, now + 400),
    st.sampled_from(["978307200", "0", "-1", "1e9", " 1", "", "٣"]),  # 2001, Arabic digit...
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
)
tokens = st.one_of(
    st.just(None),  # a fresh random hex token, as Mailgun's
    st.text(odd_chars, min_size=1, max_size=60),  # non-ASCII, NUL, spaces, surrogates
    st.sampled_from(["", "replayed-token", "x" * 300]),
    huge_text,
)


def utf8_safe(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def client_post(client, body: bytes | str, *, auth: bool, content_type="application/json"):
    response = post_body(client, body, auth=BASIC if auth else None, content_type=content_type)
    assert response.status_code < 500, (response.status_code, body[:300])
    event(f"status {response.status_code}")  # see --hypothesis-show-statistics
    return response


@pytest.fixture
def target(settings, school):
    """Configured as in production (signing key and basic auth, DEBUG off), with a guardian
    that fuzzed events may suppress. Django's log line for each refusal (an ERROR with a
    traceback, on django.security) is silenced here: hundreds of them only slow the run."""
    settings.DEBUG = False
    settings.ANYMAIL = {"MAILGUN_WEBHOOK_SIGNING_KEY": SIGNING_KEY, "WEBHOOK_SECRET": BASIC}
    factories.make_guardian(school=school, email="gone@example.org")
    security = logging.getLogger("django.security")
    previous = security.disabled
    security.disabled = True
    yield
    security.disabled = previous


@FUZZ
@given(
    body=st.one_of(
        st.binary(max_size=2000),
        huge_text.map(lambda s: s.encode("utf-8", "surrogatepass")),
        st.sampled_from([2_700_000, 6_000_000]).map(lambda n: b'{"signature": "' + b"a" * n),
    ),
    auth=st.booleans(),
    content_type=st.sampled_from(
        [
            "application/json",
            "application/json; charset=latin-1",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=xyz",
            "text/plain",
            "",
        ]
    ),
)
def test_arbitrary_bytes(client, target, body, auth, content_type):
    client_post(client, body, auth=auth, content_type=content_type)


@FUZZ
@given(value=json_values, auth=st.booleans())
def test_arbitrary_json_values(client, target, value, auth):
    client_post(client, json.dumps(value), auth=auth)


@FUZZ
@given(
    signature=st.one_of(
        json_values,
        st.dictionaries(st.sampled_from(["timestamp", "token", "signature"]), maybe_huge),
    ),
    data=st.one_of(json_values, event_data()),
    extra=st.dictionaries(odd_text, json_values, max_size=3),
    auth=st.booleans(),
)
def test_objects_with_arbitrary_signature_blocks(client, target, signature, data, extra, auth):
    body = {**extra, "signature": signature, "event-data": data}
    client_post(client, json.dumps(body), auth=auth)


@FUZZ
@given(data=st.one_of(event_data(), event_data(), json_values))
def test_correctly_signed_fresh_events_with_malformed_fields(client, target, data):
    """Authenticated, signed now with a new token: every check up to the event's own fields
    passes, and the events that do parse go on to the suppression query."""
    client_post(client, json.dumps(signed(data)), auth=True)


@FUZZ
@given(data=event_data(), timestamp=timestamps, token=tokens, auth=st.booleans())
def test_correctly_signed_odd_timestamps_and_tokens(client, target, data, timestamp, token, auth):
    """Signed with the real key over odd timestamps and tokens; a non-ASCII token is signed
    over its UTF-8 bytes (Mailgun never sends one, an attacker may)."""
    if isinstance(token, str) and not utf8_safe(token):
        token = token.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    body = signed(data, key=SIGNING_KEY, timestamp=timestamp, token=token)
    client_post(client, json.dumps(body), auth=auth)


# --- Postmark: no signature, basic auth always, a JSON object of Postmark's fields ---------------

POSTMARK_URL = "/webhooks/anymail/postmark/tracking/"
POSTMARK_FIELDS = [
    "RecordType",
    "Type",
    "TypeCode",
    "ID",
    "MessageID",
    "Email",
    "Recipient",
    "BouncedAt",
    "DeliveredAt",
    "ChangedAt",
    "Description",
    "Details",
    "Metadata",
    "Tag",
    "SuppressSending",
    "SuppressionReason",
]
postmark_plausible = {
    "RecordType": st.sampled_from(
        ["Bounce", "Delivery", "SpamComplaint", "Open", "Click", "SubscriptionChange", "Nope"]
    ),
    "Type": st.sampled_from(["HardBounce", "SoftBounce", "Transient", "Blocked", "Unknown"]),
    "Email": st.sampled_from(["gone@example.org", " GONE@example.org ", "", "x@y"]),
    "Recipient": st.sampled_from(["gone@example.org", "x@y"]),
    "BouncedAt": st.sampled_from(["2019-11-05T16:33:54.9070259Z", "2026-13-45T99:99:99Z", "soon"]),
    "MessageID": st.sampled_from(
        ["883953f4-6105-42a2-a16a-77a8eac79483", "<edsmart.delivery.1@x>"]
    ),
    "Metadata": st.fixed_dictionaries({}, optional={"edsmart_delivery": json_values}),
    "ID": st.one_of(st.integers(), odd_text, huge_text),
    "Description": maybe_huge,
    "Details": maybe_huge,
}


def postmark_event() -> st.SearchStrategy[dict]:
    """A Postmark event object."""
    return event_object(POSTMARK_FIELDS, postmark_plausible)


def postmark_post(client, body: bytes | str, *, auth: bool, content_type="application/json"):
    headers = {}
    if auth:
        headers["HTTP_AUTHORIZATION"] = "Basic " + base64.b64encode(BASIC.encode()).decode()
    response = client.generic(
        "POST", POSTMARK_URL, body, content_type=content_type, secure=True, **headers
    )
    assert response.status_code < 500, (response.status_code, body[:300])
    event(f"status {response.status_code}")
    return response


@FUZZ
@given(
    body=st.one_of(st.binary(max_size=2000), json_values.map(json.dumps)),
    auth=st.booleans(),
    content_type=st.sampled_from(["application/json", "text/plain", ""]),
)
def test_postmark_arbitrary_bodies(client, target, body, auth, content_type):
    postmark_post(client, body, auth=auth, content_type=content_type)


@FUZZ
@given(data=st.one_of(postmark_event(), postmark_event(), json_values))
def test_postmark_authenticated_events_with_malformed_fields(client, target, data):
    """Past basic auth: the events that parse go on to suppression, matching and recording."""
    postmark_post(client, json.dumps(data), auth=True)
