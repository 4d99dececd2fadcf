"""Readiness checks behind ``/readyz``: database, Redis, beat heartbeat, workers seen.

Each check returns a small dict (``ok`` and a human ``detail``) so the JSON body says exactly
what failed. Checks are independent: a dead database must not hide a dead Redis.

The details name worker hosts and carry exception texts (hosts, ports, database names), so
``/readyz`` shows them only to a caller with the metrics token; anyone else gets ``public``:
each check's ``ok`` and nothing more.
"""

from __future__ import annotations

from collections.abc import Callable

from django.db import connection

from edsmart.redis_client import redis_client
from notifications import heartbeats

Check = dict[str, object]


def _database() -> Check:
    with connection.cursor() as cur:
        cur.execute("SELECT 1")
        cur.fetchone()
    return {"ok": True, "detail": "SELECT 1 answered"}


def _redis() -> Check:
    # The shared client has short timeouts: readiness must answer quickly, never hang.
    redis_client().ping()
    return {"ok": True, "detail": "PING answered"}


def _beat() -> Check:
    age = heartbeats.beat_age_seconds()
    limit = heartbeats.beat_max_age()
    if age is None:
        return {"ok": False, "detail": "beat has never been seen", "max_age_seconds": limit}
    return {
        "ok": age <= limit,
        "detail": f"last seen {age:.0f} s ago" + ("" if age <= limit else " (too old)"),
        "age_seconds": round(age, 1),
        "max_age_seconds": limit,
    }


def _workers() -> Check:
    seen = heartbeats.workers_seen()
    limit = heartbeats.worker_max_age()
    return {
        "ok": bool(seen),
        "detail": f"{len(seen)} seen in the last {limit:.0f} s"
        if seen
        else f"no worker seen in the last {limit:.0f} s",
        "workers": seen,
    }


CHECKS: dict[str, Callable[[], Check]] = {
    "database": _database,
    "redis": _redis,
    "beat": _beat,
    "workers": _workers,
}


def public(checks: dict[str, Check]) -> dict[str, Check]:
    """What an anonymous caller may see of ``checks``: which passed and which failed."""
    return {name: {"ok": bool(check["ok"])} for name, check in checks.items()}


def readiness() -> tuple[bool, dict[str, Check]]:
    results: dict[str, Check] = {}
    for name, check in CHECKS.items():
        try:
            results[name] = check()
        except Exception as exc:  # noqa: BLE001 - any failure is the answer, not a crash
            results[name] = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"[:300]}
    return all(r["ok"] for r in results.values()), results
