"""Shared fixtures: real PostgreSQL (pytest-django), real Redis, a real SMTP server."""

from __future__ import annotations

import pytest
import redis
from django.conf import settings

from tests import factories


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
