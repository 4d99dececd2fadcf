"""Parents' pages under arbitrary input: never a 500 (project issue 13).

Hypothesis throws field names, values, sizes, encodings, raw bodies with odd content types,
methods and malformed tokens at the real view, through Django's test client, the real
middleware and a real dispatched slip reached by a genuinely signed link
(``slips.tokens.delivery_token``). Whatever it sends, the answer is below 500, and nothing is
ever recorded for a child the link does not cover.

``consent_`` followed by 5,000 digits was a 500: Python's ``int()`` refuses more than 4,300
digits (``slips.parent_forms`` now compares ids as text).
"""

from __future__ import annotations

import re
from urllib.parse import quote, urlencode

import pytest
from django.core import signing
from django.test import Client
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from notifications.models import Delivery
from slips.models import Response
from slips.tokens import LINK_SALT, delivery_token
from tests import factories

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("web_settings")]

FUZZ = hypothesis_settings(
    max_examples=100,
    deadline=None,
    # One slip for every example (the fixtures run once); huge values are built, not drawn.
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class Family:
    """A dispatched slip with a free-text question, one family's link to it, and another
    family's child that link must never answer for; plus a broadcast's link."""

    def __init__(self, school) -> None:
        [delivery], kids, _, self.slip = factories.family_slip_dispatched(
            school=school, free_text_question="Any allergies?"
        )
        self.url = f"/p/{delivery_token(delivery_id=delivery.pk)}/"
        self.token = delivery_token(delivery_id=delivery.pk)
        self.kids = [k.pk for k in kids]
        [_], [stranger], *_ = factories.family_slip_dispatched(school=school, children=1)
        self.stranger = stranger.pk
        _, mailing_id = factories.broadcast_dispatched(school=school, families=1)
        on_broadcast = Delivery.objects.filter(mailing_id=mailing_id).first()
        self.broadcast_url = f"/p/{delivery_token(delivery_id=on_broadcast.pk)}/"

    def check_nothing_foreign_recorded(self) -> None:
        answered = set(Response.objects.filter(slip=self.slip).values_list("student", flat=True))
        assert answered <= set(self.kids)
        assert not Response.objects.filter(student_id=self.stranger).exists()


@pytest.fixture
def family(school) -> Family:
    return Family(school)


@pytest.fixture
def browser() -> Client:
    """Django's test client; CSRF is checked by the tests that enforce it."""
    return Client()


def _csrf_browser(url: str) -> tuple[Client, str]:
    """A client that enforces CSRF as a browser meets it, with the cookie and form token the
    page gave it."""
    client = Client(enforce_csrf_checks=True)
    page = client.get(url).content.decode()
    found = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
    assert found, "the slip page has no CSRF token"
    return client, found.group(1)


# --- strategies ----------------------------------------------------------------------------------

# Any text UTF-8 can carry: non-ASCII, control characters, NUL.
any_text = st.text(st.characters(codec="utf-8"), max_size=40)
digits = st.text("0123456789", min_size=1, max_size=30)


def huge(alphabet: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A long run of one piece, built cheaply: past the answer's 2,000 characters, past
    ``int()``'s 4,300 digits, or just past DATA_UPLOAD_MAX_MEMORY_SIZE (2.5 MB) in UTF-8."""
    return st.builds(
        lambda piece, size: piece * (size // len(piece.encode())),
        alphabet.filter(bool),
        st.sampled_from([2_001, 4_301, 100_000, 2_700_000]),
    )


@st.composite
def field_name(draw, family_kids: list[int], stranger: int) -> str:
    prefix = draw(st.sampled_from(["consent_", "consent_", "answer_", ""]))
    suffix = draw(
        st.one_of(
            # First, as Hypothesis shrinks towards it: past int()'s limit of 4,300 digits.
            st.builds(lambda n: "9" * n, st.sampled_from([4_301, 5_000, 20_000])),
            st.sampled_from([str(k) for k in family_kids]),
            st.just(str(stranger)),
            digits,
            st.builds(lambda d: "0" * 3 + d, st.sampled_from([str(k) for k in family_kids])),
            st.sampled_from(["٣", "\uff13", "-1", "+1", " 1", "1 ", "1\n", "1e3", "0x1", ""]),
            any_text,
        )
    )
    return prefix + suffix


def field_value() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(["yes", "no", "YES", "", " yes", "yes\x00", "maybe"]),
        any_text,
        huge(st.sampled_from(["a", "é", "😀", "\x00", "yes"])),
    )


def form_fields(family: Family) -> st.SearchStrategy[list[tuple[str, str]]]:
    """A list of (name, value) pairs: repeated names, any names, any values, up to 1,500."""
    pair = st.tuples(field_name(family.kids, family.stranger), field_value())
    many = st.builds(
        lambda n: [(f"f{i}", "x") for i in range(n)], st.sampled_from([999, 1_001, 1_500])
    )
    return st.one_of(
        st.lists(pair, max_size=12),
        st.builds(lambda a, b: a + b, st.lists(pair, max_size=3), many),
    )


CHARSETS = [
    "utf-8",
    "latin-1",
    "utf-16",
    "utf-32",
    "ascii",
    "cp1252",
    "shift_jis",
    "idna",
    "punycode",
    "rot13",
    "base64",
    "hex",
    "zlib",
    "undefined",
    "unicode_escape",
    "no-such-charset",
    "",
]

content_type = st.one_of(
    st.sampled_from(
        [
            "application/x-www-form-urlencoded",
            "multipart/form-data",
            "multipart/form-data; boundary=",
            "multipart/form-data; boundary=BoUnDaRy",
            'multipart/form-data; boundary="BoUnDaRy"',
            "multipart/mixed; boundary=BoUnDaRy",
            "text/plain",
            "application/json",
            "application/octet-stream",
            "",
            ";",
            "x/x; charset",
        ]
    ),
    st.builds(
        lambda kind, charset: f"{kind}; charset={charset}",
        st.sampled_from(["application/x-www-form-urlencoded", "multipart/form-data"]),
        st.sampled_from(CHARSETS),
    ),
    st.builds(lambda b: f"multipart/form-data; boundary={b}", any_text),
    any_text,
)


@st.composite
def multipart_body(draw) -> bytes:
    """Something shaped like multipart with the boundary ``BoUnDaRy``, broken in any way."""
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.one_of(any_text, st.just("consent_" + "9" * 5000)))
        headers = draw(
            st.sampled_from(
                [
                    f'Content-Disposition: form-data; name="{name}"',
                    f'Content-Disposition: form-data; name="{name}"; filename="x.txt"',
                    f"Content-Disposition: form-data; name*=UTF-8''{quote(name)}",
                    "Content-Disposition: attachment",
                    f'Content-Disposition: form-data; name="{name}"\r\n'
                    "Content-Transfer-Encoding: base64",
                    "",
                ]
            )
        )
        value = draw(st.one_of(st.binary(max_size=64), st.just(b"yes")))
        parts.append(b"--BoUnDaRy\r\n" + headers.encode("utf-8", "replace") + b"\r\n\r\n" + value)
    tail = draw(st.sampled_from([b"\r\n--BoUnDaRy--\r\n", b"", b"\r\n--BoUnDaRy"]))
    return b"\r\n".join(parts) + tail


def raw_body(family: Family) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=256),
        multipart_body(),
        # A plausible urlencoded answer, in some encoding, declared or not.
        st.builds(
            lambda fields, charset: urlencode(fields, encoding=charset, errors="replace").encode(
                "ascii"
            ),
            form_fields(family),
            st.sampled_from(["utf-8", "latin-1", "utf-16", "cp1252"]),
        ),
        st.builds(lambda n: b"%" * n, st.sampled_from([1, 3, 2_700_000])),
        st.builds(lambda n: b"consent_" + b"9" * n + b"=yes", st.sampled_from([4_301, 5_000])),
    )


def tokens(family: Family) -> st.SearchStrategy[str]:
    """Tokens that are not a valid link: garbage, mutations of a real one, and tokens signed
    with the right salt around payloads that are not a delivery id."""
    real = family.token

    def mutate(pos: int, char: str) -> str:
        pos %= len(real)
        return real[:pos] + char + real[pos + 1 :]

    signed = st.builds(
        lambda payload: signing.dumps(payload, salt=LINK_SALT, compress=True),
        st.one_of(
            # Not a positive id that may exist: that would be a genuine link.
            st.fixed_dictionaries(
                {
                    "d": st.one_of(
                        st.integers(max_value=0),
                        st.integers(min_value=2**63),
                        st.floats(allow_nan=False),
                        any_text,
                        st.none(),
                        st.lists(st.integers(), max_size=2),
                    )
                }
            ),
            st.just({"d": 10**30}),
            st.just({"d": -1}),
            st.just({"d": True}),
            st.just({}),
            st.just([]),
            any_text,
            st.integers(),
        ),
    )
    return st.one_of(
        any_text,
        st.builds(mutate, st.integers(0, 10_000), st.characters(codec="utf-8")),
        st.builds(lambda n: real[:n], st.integers(0, len(real) - 1)),
        st.builds(lambda extra: real + extra, any_text.filter(bool)),
        st.builds(lambda n: "a" * n, st.sampled_from([255, 256, 257, 10_000])),
        st.builds(lambda d: f"{real.split(':')[0]}:{d}:{'A' * 43}", digits),
        st.just(signing.dumps({"d": 1}, salt="another-salt")),
        signed,
    ).filter(lambda t: "/" not in t and t != real)


def _path(token: str) -> str:
    return f"/p/{quote(token, safe='')}/"


# --- the tests -----------------------------------------------------------------------------------


def _form_post(client: Client, url: str, fields: dict[str, str] | list[tuple[str, str]]):
    """A POST as a browser's form makes it (urlencoded): long field names survive it, where
    Django's multipart parser drops them."""
    return client.post(url, urlencode(fields), content_type="application/x-www-form-urlencoded")


def test_consent_with_5000_digits_is_refused_not_a_500(family, browser):
    """The reported case, without Hypothesis."""
    assert _form_post(browser, family.url, {"consent_" + "9" * 5000: "yes"}).status_code == 400
    answer_too = {f"consent_{family.kids[0]}": "yes", "answer_" + "1" * 5000: ""}
    assert _form_post(browser, family.url, answer_too).status_code == 400
    assert browser.post(family.url, {"consent_" + "9" * 5000: "yes"}).status_code == 400
    assert not Response.objects.exists()
    # Leading zeros name the same child: not foreign, and not a field of the form either.
    leading = {f"consent_000{family.kids[0]}": "yes"}
    assert _form_post(browser, family.url, leading).status_code == 400
    assert not Response.objects.exists()
    # Another family's child is still refused outright, however the id is written.
    for name in (f"consent_{family.stranger}", f"consent_0{family.stranger}"):
        fields = {f"consent_{family.kids[0]}": "yes", name: "yes"}
        assert _form_post(browser, family.url, fields).status_code == 400
    assert not Response.objects.exists()


@FUZZ
@given(data=st.data())
def test_any_form_fields_posted_to_a_slip_never_500(family, browser, data):
    fields = data.draw(form_fields(family))
    encoding = data.draw(st.sampled_from(["multipart", "urlencoded", "urlencoded"]))
    if encoding == "multipart":
        payload: dict[str, list[str]] = {}
        for name, value in fields:
            payload.setdefault(name, []).append(value)
        response = browser.post(family.url, payload)
    else:
        response = _form_post(browser, family.url, fields)
    assert response.status_code < 500
    family.check_nothing_foreign_recorded()


@FUZZ
@given(data=st.data())
def test_any_body_with_any_content_type_never_500s(family, browser, data):
    body = data.draw(raw_body(family))
    ctype = data.draw(content_type)
    method = data.draw(st.sampled_from(["POST", "POST", "POST", "PUT", "PATCH", "GET"]))
    url = data.draw(st.sampled_from([family.url, family.url, family.broadcast_url]))
    response = browser.generic(method, url, data=body, content_type=ctype)
    assert response.status_code < 500
    family.check_nothing_foreign_recorded()


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_any_body_past_a_real_csrf_check_never_500s(family, data):
    """As a browser meets it: CSRF enforced, with the cookie and token of the page, so the
    middleware reads the body before the view does."""
    client, csrf = _csrf_browser(family.url)
    body = data.draw(raw_body(family))
    ctype = data.draw(content_type)
    response = client.generic(
        "POST", family.url, data=body, content_type=ctype, headers={"X-CSRFToken": csrf}
    )
    assert response.status_code < 500
    fields = data.draw(form_fields(family))
    response = client.post(family.url, {**dict(fields), "csrfmiddlewaretoken": csrf})
    assert response.status_code < 500
    family.check_nothing_foreign_recorded()


@FUZZ
@given(data=st.data())
def test_malformed_tokens_are_refused_for_every_method(family, browser, data):
    token = data.draw(tokens(family))
    method = data.draw(st.sampled_from(METHODS))
    fields = data.draw(
        st.lists(st.tuples(field_name(family.kids, family.stranger), any_text), max_size=3)
    )
    if method == "POST":
        response = browser.post(_path(token), dict(fields))
    else:
        response = browser.generic(method, _path(token))
    assert 400 <= response.status_code < 500, (token, method, response.status_code)
    family.check_nothing_foreign_recorded()


def test_the_genuine_link_still_works(family, browser):
    """The fuzzing above is against a page that works: a plain answer is recorded."""
    assert browser.get(family.url).status_code == 200
    response = browser.post(family.url, {f"consent_{family.kids[0]}": "yes"})
    assert response.status_code == 302
    assert list(Response.objects.values_list("student", flat=True)) == [family.kids[0]]
