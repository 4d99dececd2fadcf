"""A pytest plugin: each pytest-xdist worker gets its own Redis database, before Django reads
its settings.

The suite runs in two processes (``-n 2`` in pyproject.toml): most of its time is spent
waiting on real worker processes, SMTP exchanges and PostgreSQL, not on the CPU. pytest-django
already gives each process its own test database (``test_..._gw0``, ``_gw1``); Redis needs
the same, because tests empty their database and the rate bucket, fair-share turns and nudges
live there. Loaded with ``-p`` (pyproject.toml's addopts) so that this runs before
pytest-django imports the settings, which read ``REDIS_URL`` once; it lives in an installed
package, not in ``tests/``, so that ``-p`` finds it whatever the way pytest is started.
Worker ``gwN`` uses the configured database number plus N.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

REDIS_DATABASES = 16  # redis.conf's default "databases 16"


def worker_redis_url(url: str, worker: str) -> str:
    """``url`` with its database number moved up by the worker's index (``gw1`` -> +1)."""
    parts = urlsplit(url)
    base = int(parts.path.lstrip("/") or 0)
    db = base + int(worker.removeprefix("gw"))
    if db >= REDIS_DATABASES:
        raise RuntimeError(
            f"REDIS_URL uses database {base}; xdist worker {worker} would need {db}, past "
            f"Redis's {REDIS_DATABASES}: choose a lower database number or fewer workers (-n)"
        )
    return urlunsplit(parts._replace(path=f"/{db}"))


# The URL before any worker's shift, kept so that a pytest started inside a worker (the
# devstack's own tests run one) shifts from it again rather than from a shifted URL.
BASE_VARIABLE = "EDSMART_REDIS_URL_BEFORE_XDIST"

_worker = os.environ.get("PYTEST_XDIST_WORKER")
if _worker and os.environ.get("REDIS_URL"):
    _base = os.environ.setdefault(BASE_VARIABLE, os.environ["REDIS_URL"])
    os.environ["REDIS_URL"] = worker_redis_url(_base, _worker)
