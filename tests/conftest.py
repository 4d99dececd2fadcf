"""Shared fixtures: real PostgreSQL (pytest-django), real Redis, a real SMTP server."""

from __future__ import annotations

import logging

import pytest
import redis
from django.conf import settings

from tests import factories

logging.getLogger("mail.log").setLevel(logging.WARNING)


# The marks of the tests that take longest: real processes, a browser, long state machines.
LONG_RUNNING = ("workers", "browser", "slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files with long-running tests first, otherwise in the usual order. With pytest-xdist
    (a file per process at a time, in collection order) the long files then run beside the
    many short ones instead of last, one after another, on one process."""

    def long_running(item: pytest.Item) -> bool:
        return any(item.get_closest_marker(name) for name in LONG_RUNNING)

    long_files = {item.path for item in items if long_running(item)}
    items.sort(key=lambda item: item.path not in long_files)


@pytest.fixture
def redis_client() -> redis.Redis:
    """The project's Redis database, emptied before the test (it is a test-only database)."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def school():
    return factories.make_school(slug="northside")


@pytest.fixture
def other_school():
    return factories.make_school(slug="southside")


@pytest.fixture(scope="session")
def smtp_session():
    from tests.smtp_server import SMTPServer

    server = SMTPServer().start()
    yield server
    server.stop()


@pytest.fixture
def smtp(smtp_session, settings):
    """The real SMTP server, reset, with Django pointed at it."""
    smtp_session.handler.reset()
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST = "127.0.0.1"
    settings.EMAIL_PORT = smtp_session.port
    settings.EMAIL_USE_TLS = False
    settings.EMAIL_HOST_USER = ""
    settings.EMAIL_HOST_PASSWORD = ""
    return smtp_session


@pytest.fixture
def web_settings(settings):
    """Plain HTTP and unhashed static files, as with DEBUG on, so the test client can render
    the admin and parents' pages; production's HTTPS redirect is not what these tests test.
    The MD5 hasher only makes creating users fast."""
    settings.SECURE_SSL_REDIRECT = False
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }
    return settings
