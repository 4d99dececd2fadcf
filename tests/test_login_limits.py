"""Login guessing is limited per account and per address (django-axes), through the real admin
login form: the lock-out page says what happened and for how long, a success clears the count,
the lock lifts after the cool-off, and ops can lift it sooner with axes' commands."""

from __future__ import annotations

import datetime as dt
import io
import logging

import pytest
from axes.models import AccessAttempt
from django.conf import settings as django_settings
from django.contrib.auth import SESSION_KEY, get_user_model
from django.core.management import call_command
from django.test import Client
from django.urls import reverse

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("web_settings")]

PASSWORD = "the-right-password-for-tests"
LIMIT = 5


@pytest.fixture(autouse=True)
def _limits(settings) -> None:
    """The shipped limits, pinned so that a changed default shows up here first."""
    assert settings.AXES_FAILURE_LIMIT == LIMIT
    assert settings.AXES_COOLOFF_TIME.total_seconds() == 15 * 60
    assert settings.AXES_LOCKOUT_PARAMETERS == ["username", "ip_address"]
    assert settings.AXES_RESET_ON_SUCCESS is True


@pytest.fixture
def staff():
    return get_user_model().objects.create_user("alice", password=PASSWORD, is_staff=True)


def login(username: str, password: str, *, ip: str = "192.0.2.10", **headers: str):
    """One attempt on the admin login page from a fresh browser at ``ip``."""
    client = Client(REMOTE_ADDR=ip)
    response = client.post(
        reverse("admin:login"),
        {"username": username, "password": password, "next": reverse("admin:index")},
        **headers,
    )
    response.logged_in = SESSION_KEY in client.session
    return response


def fail(times: int, username: str = "alice", **kwargs: str) -> list:
    return [login(username, f"wrong-{n}", **kwargs) for n in range(times)]


def assert_locked_page(response) -> None:
    assert response.status_code == 429
    assert not response.logged_in
    text = response.content.decode()
    assert "Login blocked for now" in text
    assert f"{LIMIT} failed logins in a row" in text
    assert "blocked for 15 minutes" in text


def test_a_right_password_logs_in(staff) -> None:
    response = login("alice", PASSWORD)
    assert response.status_code == 302 and response.logged_in


def test_wrong_passwords_below_the_limit_only_say_wrong(staff) -> None:
    for response in fail(LIMIT - 1):
        assert response.status_code == 200 and not response.logged_in
        assert "Please enter the correct username and password" in response.content.decode()
    assert login("alice", PASSWORD).logged_in


def test_the_account_is_locked_after_the_limit_even_with_the_right_password(staff) -> None:
    *before, last = fail(LIMIT)
    assert all(r.status_code == 200 for r in before)
    assert_locked_page(last)
    locked = login("alice", PASSWORD)
    assert_locked_page(locked)


def test_an_account_is_locked_whichever_addresses_the_guesses_come_from(staff) -> None:
    for n in range(LIMIT):
        fail(1, ip=f"198.51.100.{n + 1}")
    assert_locked_page(login("alice", PASSWORD, ip="203.0.113.99"))


def test_an_address_is_locked_whichever_accounts_it_tries(staff) -> None:
    for n in range(LIMIT):
        fail(1, username=f"guess{n}", ip="198.51.100.7")
    assert_locked_page(login("alice", PASSWORD, ip="198.51.100.7"))
    # The account itself was not guessed at: from elsewhere it logs in.
    assert login("alice", PASSWORD, ip="203.0.113.5").logged_in


def test_spelling_the_username_differently_counts_against_the_same_account(staff) -> None:
    """The login form strips and NFKC-normalizes the username, so axes must count it the
    same way: " alice" and "alice" in full-width letters are alice."""
    full_width = "\uff41\uff4c\uff49\uff43\uff45"
    for n, spelling in enumerate(["alice", " alice", "alice ", full_width, "\talice"]):
        login(spelling, "wrong", ip=f"198.51.100.{n + 1}")
    assert_locked_page(login("alice", PASSWORD, ip="203.0.113.5"))


def test_a_forged_forwarded_for_header_does_not_give_a_new_address(staff) -> None:
    """Without EDSMART_BEHIND_PROXY the peer's address counts, not X-Forwarded-For."""
    for n in range(LIMIT):
        login(f"guess{n}", "wrong", ip="198.51.100.7", HTTP_X_FORWARDED_FOR=f"10.9.9.{n}")
    assert_locked_page(login("alice", PASSWORD, ip="198.51.100.7", HTTP_X_FORWARDED_FOR="10.1.1.1"))


def test_behind_a_proxy_the_address_the_proxy_saw_counts(staff, settings) -> None:
    settings.EDSMART_BEHIND_PROXY = True
    proxy = "10.0.0.2"
    for n in range(LIMIT):
        # The client may prepend anything; the proxy appends the address it saw.
        login(f"guess{n}", "wrong", ip=proxy, HTTP_X_FORWARDED_FOR=f"1.2.3.{n}, 198.51.100.7")
    assert_locked_page(login("alice", PASSWORD, ip=proxy, HTTP_X_FORWARDED_FOR="198.51.100.7"))
    # Another client behind the same proxy is not locked out with it.
    assert login("alice", PASSWORD, ip=proxy, HTTP_X_FORWARDED_FOR="203.0.113.8").logged_in


def test_a_success_clears_the_count(staff) -> None:
    fail(LIMIT - 1)
    assert login("alice", PASSWORD).logged_in
    responses = fail(LIMIT - 1)
    assert all(r.status_code == 200 for r in responses)
    assert login("alice", PASSWORD).logged_in


def test_the_lock_lifts_after_the_cool_off(staff) -> None:
    fail(LIMIT)
    assert_locked_page(login("alice", PASSWORD))
    # Failures while locked do not extend the lock: it lifts 15 minutes after the fifth.
    AccessAttempt.objects.update(attempt_time=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=14))
    assert_locked_page(login("alice", PASSWORD))
    AccessAttempt.objects.update(attempt_time=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=16))
    assert login("alice", PASSWORD).logged_in


@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("axes_reset_username", ["alice"]),
        ("axes_reset_ip", ["192.0.2.10"]),
        ("axes_reset", []),
    ],
)
def test_ops_unlock_commands_lift_the_lock(staff, command, args) -> None:
    fail(LIMIT, username="alice", ip="192.0.2.10")
    assert_locked_page(login("alice", PASSWORD, ip="192.0.2.10"))
    out = io.StringIO()
    call_command(command, *args, stdout=out)
    assert "removed" in out.getvalue()
    assert login("alice", PASSWORD, ip="192.0.2.10").logged_in


def test_passwords_are_neither_stored_nor_logged(staff, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "Sup3r-secret-guess"
    login("alice", secret)
    attempt = AccessAttempt.objects.get()
    assert secret not in attempt.post_data and secret not in attempt.get_data
    assert secret not in caplog.text


def test_force_login_is_not_affected(staff) -> None:
    """Tests (and nothing else) log in with force_login: it picks the model backend."""
    assert django_settings.AUTHENTICATION_BACKENDS[0] == "axes.backends.AxesStandaloneBackend"
    fail(LIMIT)
    client = Client()
    client.force_login(staff)
    assert client.get(reverse("admin:index")).status_code == 200
