"""Running behind a transaction-mode pooler: nothing of ours may live in a database session.

The pipeline and fault tests themselves run through a private PgBouncer in CI (``.ci/run``,
``edsmart/devstack/pgbouncer.py``); with prepared statements left on they fail there ("prepared
statement _pg3_4 already exists" in a worker). These tests pin what makes them pass: the
settings a pooler needs, that "off" really leaves no server-side prepared statement behind
(psycopg's own default would prepare after five runs), and that the CI helper cannot pass a
command that never went through its PgBouncer.
"""

from __future__ import annotations

import sys

import pytest
from django.db import connection
from django.utils import timezone

from edsmart.devstack.pgbouncer import pgbouncer_executable
from notifications import batch, dispatch, transitions
from slips.services import message_schedule
from tests import factories
from tests.invariants import assert_exactly_once
from tests.processes import run_python
from tests.test_settings import _clean_env


def _prepared_statements() -> int:
    with connection.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_prepared_statements")
        return cur.fetchone()[0]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("prepared", [True, False], ids=["on", "off"])
def test_prepared_statements_off_leaves_none_on_the_server(
    school, smtp, redis_client, monkeypatch: pytest.MonkeyPatch, prepared: bool
) -> None:
    """A broadcast sent in-process on a fresh connection: with the setting off, the session
    holds no prepared statement afterwards; on, the hot path's are there (so this can fail)."""
    options = connection.settings_dict["OPTIONS"]
    monkeypatch.setitem(options, "prepare_threshold", 5 if prepared else None)
    monkeypatch.setattr(transitions, "PREPARE", prepared)
    connection.close()  # the next statement connects with these options
    for _ in range(12):  # more emails than psycopg's default threshold of five runs
        factories.make_family(school=school)
    message_schedule(message=factories.make_broadcast(school=school), send_at=timezone.now())
    [mailing_id] = dispatch.dispatch_due()
    while batch.batch_send(mailing_id=mailing_id).claimed:
        pass
    assert_exactly_once(smtp.accepted)
    assert len(smtp.accepted) == 12
    count = _prepared_statements()
    assert (count > 0) if prepared else (count == 0), count
    connection.close()  # later tests get a connection with the project's own options


def test_transaction_pooler_settings() -> None:
    """DB_TRANSACTION_POOLER=1: no prepared statements (threshold None, and the pipeline's
    explicit ``prepare=`` False), no Django server-side cursors; DB_PREPARED_STATEMENTS=1 may
    still say the pooler tracks them (PgBouncer 1.21+)."""
    code = (
        "import django; django.setup(); from django.conf import settings as s; "
        "from notifications import transitions as t; d = s.DATABASES['default']; "
        "print(d['OPTIONS'].get('prepare_threshold'), d['DISABLE_SERVER_SIDE_CURSORS'], t.PREPARE)"
    )
    env = _clean_env(DEBUG="1", DJANGO_SETTINGS_MODULE="edsmart.settings")
    env.pop("DB_PREPARED_STATEMENTS", None)
    env.pop("DB_TRANSACTION_POOLER", None)
    result = run_python("-c", code, env={**env, "DB_TRANSACTION_POOLER": "1"}, timeout=60)
    assert result.stdout.split() == ["None", "True", "False"], result.stdout + result.stderr
    result = run_python(
        "-c",
        code,
        env={**env, "DB_TRANSACTION_POOLER": "1", "DB_PREPARED_STATEMENTS": "1"},
        timeout=60,
    )
    assert result.stdout.split() == ["5", "True", "True"], result.stdout + result.stderr
    result = run_python("-c", code, env=env, timeout=60)
    assert result.stdout.split() == ["5", "False", "True"], result.stdout + result.stderr


@pytest.mark.skipif(pgbouncer_executable() is None, reason="pgbouncer not installed")
def test_pgbouncer_helper_fails_a_command_that_never_used_it() -> None:
    """A mis-wired CI step (its tests talking straight to PostgreSQL) must not pass."""
    env = _clean_env(DATABASE_URL=_upstream_url())
    vacuous = run_python(
        "-m", "edsmart.devstack.pgbouncer", "--", sys.executable, "-c", "pass", env=env, timeout=60
    )
    assert vacuous.returncode == 1, vacuous.stderr
    assert "no transaction went through pgbouncer" in vacuous.stderr
    used = run_python(
        *("-m", "edsmart.devstack.pgbouncer", "--", sys.executable, "-c"),
        "import os, psycopg; "
        "psycopg.connect(os.environ['DATABASE_URL'], autocommit=True).execute('SELECT 1')",
        env=env,
        timeout=60,
    )
    assert used.returncode == 0, used.stderr
    assert "carried 1 transactions" in used.stderr, used.stderr


def _upstream_url() -> str:
    """The test database's server (PgBouncer forwards by host and port, not database)."""
    s = connection.settings_dict
    host, port = s["HOST"] or "127.0.0.1", s["PORT"] or 5432
    return f"postgres://{s['USER'] or 'postgres'}@{host}:{port}/postgres"
