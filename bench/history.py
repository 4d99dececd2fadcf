"""A year of history: every check, scrape and staff page stays fast at 10 million deliveries.

    .venv/bin/python bench/history.py [--deliveries N] [--schools N] [--reps N] [--rebuild]
        [--explain] [--send-reps N] [--budget SECONDS] [--db-prefix NAME]

Why: the watch runs every minute, Prometheus scrapes every few seconds and staff open the admin
all day, for years. Whatever they read must not grow with the deliveries already sent: a year
of a thousand schools is about ten million rows, and a read that counts them all is fine in
every test and fails in production months later. This bench builds that year and measures
each of those reads on an empty database and on the full one, side by side.

What it builds, on the shared PostgreSQL at 127.0.0.1:5432 (user ``postgres``; a superuser,
needed for ``session_replication_role``):

- ``<prefix>_empty`` (default ``edsmart_history_empty``), made afresh on every run: migrated
  (``manage.py migrate``), with the same base as the full one and no history: ``--schools``
  schools (school 1, "Big School", is the big one), a whole-school audience each, a superuser
  (``history-root``), a staff user of the big school (``history-staff``, an admin through
  ``slips.Membership``) and the big school's 200 families (a student and a guardian each,
  ``p{n}@s1.example``).
- ``<prefix>_full`` (default ``edsmart_history_full``): the same base plus the history, built
  with SQL (``INSERT ... SELECT`` over ``generate_series``; the ORM would take hours) and kept
  between runs (a marker table, ``bench_history_build``, records a complete build and its
  parameters; ``--rebuild``, or other ``--deliveries``/``--schools``, builds it again). It is
  migrated on every run, so a new migration is applied to the kept history too.

The history (``--deliveries``, default 10,000,000, over ``--schools``, default 1,000):

- about 100 deliveries per mailing (50 to 150), each mailing a broadcast or a slip with its
  source row, created uniformly over the past 365 days, ids in time order; completed five
  minutes after creation, 1% cancelled (the second half of their rows cancelled, each with an
  event). Addresses ``p{n}@s{school}.example``, n within the school's 600 families, so a
  parent appears across their school's mailings;
- rows: ~97% sent (``accepted`` 1, short provider and Message-ID strings; 40% of them opened,
  2% with a ``retry_wait`` event before, 0.02% an ``unknown`` a person resolved: two events),
  ~1.5% failed (an event), ~1% skipped (none), ~0.5% cancelled; 20 ``unknown`` rows (an event
  each) in the newest mailings, waiting for ops; accepted sends have no event, as in the
  pipeline;
- the big school: ``min(500, deliveries / 20,000)`` slips to its 200 families (500 x 200 =
  100,000 deliveries at full scale) and a Response per slip and student (100,000);
- five open mailings (broadcasts, status ``paused`` so no worker claims them) of 500 rows, half
  sent and half pending, created in the last three hours;
- the secondary indexes of the deliveries and events tables (those not backing a constraint)
  are dropped before the load and recreated from their saved definitions after it; foreign
  keys are not checked during the load (``session_replication_role = replica``: the rows are
  consistent by construction); then every closed mailing is summarised by the real code path,
  ``notifications.summaries.mailings_summarise()`` (timed); each summary's ``summarised_at``
  is then set to its mailing's completion + 5 s (the sweep writes it seconds after completion,
  so a read of "summarised in the last N minutes" must not find the whole year), and the
  database is vacuumed and analysed, as autovacuum would have over the year.

What it measures, in this process, with Django's test ``Client`` (``force_login``, HTTPS)
against each database in turn: one warm-up, then the median of ``--reps`` (default 5) runs,
timed with ``time.perf_counter``; an item whose warm-up shows that ``--reps`` runs would take
longer than ``--budget`` seconds (default 60) gets fewer runs (at least one; the table says
how many):

- one ``notifications.alerts.watch()`` pass (bound 100 ms on the full database);
- ``GET /metrics`` with the bearer token (100 ms);
- ``GET /ops/`` as the superuser (100 ms);
- ``call_command("delivery_report", json=True)`` (300 ms);
- the big school's admin lists as its staff user: deliveries, mailings, responses, first page
  (200 ms each); the same three as the superuser, every school (reported only); a parent's
  deliveries found by address as the staff user, ``/admin/notifications/delivery/?q=...``
  (reported only);
- a new broadcast to the big school's 200 families through the real pipeline: a private
  Redis (``bench.soak.PrivateRedis``), the recording SMTP sink (``bench/smtp_sink.py``), one
  ``celery worker -Q periodic,send --concurrency 2`` and one ``celery beat`` as production runs
  them (``bench.soak.Roles``), against the database measured. The broadcast is scheduled for
  tomorrow off the clock; the clock runs from moving its send time to now (and publishing
  ``dispatch_due``, as beat would within a second) to the last of its 200 deliveries'
  recorded outcome (its ``updated_at``). One warm-up send, then the median of ``--send-reps``
  (default 3), a fresh broadcast each time; bound: at most 1.2 x the empty database's figure.
  These broadcasts are deleted again at the end, so the kept history does not grow.

Before measuring a database its alerts and heartbeats are deleted (the full one keeps those of
its last run otherwise), and the private Redis is emptied.

It prints the build (phases and time, or the kept build's), the counts of what the full
database holds (deliveries, events, mailings, summaries, responses), then the table: item,
empty ms, full ms, full/empty, bound, met/MISSED (or ERROR, with the traceback printed above
it). ``--explain``: for each item but the send (it runs in the workers), on the full database,
every query over 5 ms (grouped by shape, the slowest of each) with its ``EXPLAIN (ANALYZE,
BUFFERS)`` when it is a read; writes are named and skipped.

Exit status 1 when a bound is missed or an item failed, 2 when the bench could not be carried
out, 130 when interrupted (the workers, beat, sink and Redis are stopped first).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import logging
import re
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.peak import beat_ticking  # noqa: E402
from bench.soak import (  # noqa: E402
    PrivateRedis,
    Roles,
    Sink,
    SoakError,
    child_env,
    db_forget,
    django_setup,
    roles_env,
    run_header,
    run_in_workdir,
    wait_for,
)
from bench.soak import migrate as soak_migrate  # noqa: E402

SERVER_URL = "postgres://postgres@127.0.0.1:5432"
BUILD_VERSION = 3  # bump when the generator changes: a kept build of another version is rebuilt
MARKER_TABLE = "bench_history_build"
METRICS_TOKEN = "history-bench-metrics-token"

BIG_SCHOOL = 1
BIG_FAMILIES = 200
BIG_MAX_SLIPS = 500
OTHER_FAMILIES = 600
MEAN_MAILING = 100  # sizes 50..150
OPEN_MAILINGS = 5
OPEN_SIZE = 500
UNKNOWN_ROWS = 20
ROOT_USER = 1
STAFF_USER = 2
SEARCHED = "p17@s1.example"  # a parent of the big school
SEND_TITLE = "History bench send"
CHUNK_MAILINGS = 10_000  # about a million deliveries per INSERT
SLOW_QUERY_SECONDS = 0.005
SEND_TIMEOUT = 120.0
SEND_RATIO_BOUND = 1.2
# Open statuses, as the pipeline's (a row in one of them can still change).
OPEN_STATUSES = ("pending", "claimed", "submitting", "retry_wait")
# Tables given explicit ids, whose identity sequences must then be moved past them.
EXPLICIT_ID_TABLES = (
    "auth_user",
    "slips_school",
    "slips_audience",
    "slips_student",
    "slips_guardian",
    "slips_slip",
    "slips_broadcast",
    "notifications_mailing",
)
BULK_TABLES = ("notifications_delivery", "notifications_deliveryevent")


class BenchError(SoakError):
    """The bench could not be carried out (as opposed to a figure missing its bound)."""


def say(text: str) -> None:
    print(f"history | {text}", flush=True)


# --- options ---------------------------------------------------------------------------------


@dataclass
class Options:
    deliveries: int
    schools: int
    reps: int
    send_reps: int
    rebuild: bool
    explain: bool
    budget: float
    db_prefix: str

    @property
    def full_db(self) -> str:
        return f"{self.db_prefix}_full"

    @property
    def empty_db(self) -> str:
        return f"{self.db_prefix}_empty"


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    p.add_argument("--deliveries", type=int, default=10_000_000, help="the history's size")
    p.add_argument("--schools", type=int, default=1000, help="at least 7")
    p.add_argument("--reps", type=int, default=5, help="measured runs per item (median)")
    p.add_argument("--send-reps", type=int, default=9, help="measured new sends (median)")
    p.add_argument("--rebuild", action="store_true", help="build the full database again")
    p.add_argument("--explain", action="store_true", help="plans of queries over 5 ms")
    p.add_argument("--budget", type=float, default=60.0, help="max seconds of runs per item")
    p.add_argument("--db-prefix", default="edsmart_history", help="the databases' names")
    a = p.parse_args(argv)
    if a.schools < OPEN_MAILINGS + 2:
        p.error(f"--schools takes at least {OPEN_MAILINGS + 2}")
    if a.deliveries < 10 * BIG_FAMILIES:
        p.error(f"--deliveries takes at least {10 * BIG_FAMILIES}")
    if a.reps < 1 or a.send_reps < 1:
        p.error("--reps and --send-reps take at least 1")
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,40}", a.db_prefix):
        p.error("--db-prefix takes a lower-case SQL name")
    return Options(
        a.deliveries,
        a.schools,
        a.reps,
        a.send_reps,
        a.rebuild,
        a.explain,
        a.budget,
        a.db_prefix,
    )


# --- the databases ---------------------------------------------------------------------------


def database_url(name: str) -> str:
    return f"{SERVER_URL}/{name}"


def use_database(name: str) -> None:
    """Point this process's Django connection at ``name``: both databases are read from one
    process, so that both are measured by the same code, warmed up the same way."""
    from django.contrib.contenttypes.models import ContentType
    from django.db import connections

    connections.close_all()
    connections["default"].settings_dict["NAME"] = name
    ContentType.objects.clear_cache()


def recreate_and_migrate(name: str, env: dict[str, str]) -> None:
    from bench.send_throughput import recreate_database

    db_forget()
    recreate_database(name)
    migrate(name, env)


def migrate(name: str, env: dict[str, str]) -> None:
    # Up to an hour: a migration on the full database may build indexes over 10 M rows.
    soak_migrate({**env, "DATABASE_URL": database_url(name)}, timeout=3600)


def run_sql(sql: str, params: dict[str, Any] | None = None) -> int:
    """One statement on Django's connection; returns its row count."""
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(sql, params)
        return cur.rowcount


def fetch(sql: str, params: dict[str, Any] | None = None) -> list[tuple]:
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall()


def sequences_fix() -> None:
    """Identity columns do not move when ids are given: move them past the largest."""
    for table in EXPLICIT_ID_TABLES:
        run_sql(
            f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "  # noqa: S608 - constants
            f"coalesce(max(id), 1), max(id) IS NOT NULL) FROM {table}"
        )


# --- the base: what both databases hold --------------------------------------------------------

BASE_SQL = (
    """
    INSERT INTO auth_user (id, password, last_login, is_superuser, username, first_name,
                           last_name, email, is_staff, is_active, date_joined)
    VALUES (%(root)s, '!', NULL, true, 'history-root', '', '', 'root@history.example', true,
            true, now()),
           (%(staff)s, '!', NULL, false, 'history-staff', '', '', 'staff@s1.example', true,
            true, now())
    """,
    """
    INSERT INTO slips_school (id, name, slug, time_zone, sender_name, sender_email,
                              sending_paused, created_at, quiet_hours_start, quiet_hours_end)
    SELECT i, CASE WHEN i = %(big)s THEN 'Big School' ELSE 'School ' || i END, 's' || i,
           'Australia/Sydney', '', 'office@s' || i || '.example', false,
           now() - interval '400 days', '21:00', '07:00'
    FROM generate_series(1, %(schools)s) AS i
    """,
    """
    INSERT INTO slips_membership (role, user_id, school_id) VALUES ('admin', %(staff)s, %(big)s)
    """,
    """
    INSERT INTO slips_audience (id, name, whole_school, created_at, school_id)
    SELECT i, 'Everyone', true, now() - interval '400 days', i
    FROM generate_series(1, %(schools)s) AS i
    """,
    """
    INSERT INTO slips_student (id, first_name, last_name, year_level, external_id, created_at,
                               school_id)
    SELECT n + 1, 'Kid' || n, 'History', '3', '', now() - interval '400 days', %(big)s
    FROM generate_series(0, %(families)s - 1) AS n
    """,
    """
    INSERT INTO slips_guardian (id, name, email, email_normalized, phone, receives_email,
                                suppressed_at, suppressed_reason, created_at, school_id)
    SELECT n + 1, 'Parent ' || n, 'p' || n || '@s' || %(big)s || '.example',
           'p' || n || '@s' || %(big)s || '.example', '', true, NULL, '',
           now() - interval '400 days', %(big)s
    FROM generate_series(0, %(families)s - 1) AS n
    """,
    """
    INSERT INTO slips_guardian_students (guardian_id, student_id)
    SELECT n, n FROM generate_series(1, %(families)s) AS n
    """,
)


def seed_base(schools: int) -> None:
    """Schools, audiences, the two users and the big school's families, with fixed ids, so
    that both databases hold the same base and the same ids."""
    params = {
        "root": ROOT_USER,
        "staff": STAFF_USER,
        "big": BIG_SCHOOL,
        "schools": schools,
        "families": BIG_FAMILIES,
    }
    for sql in BASE_SQL:
        run_sql(sql, params)
    sequences_fix()
    run_sql("ANALYZE")


# --- the history -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """How many mailings of each group make the asked-for number of deliveries."""

    big_mailings: int
    other_mailings: int
    open_mailings: int

    @classmethod
    def of(cls, deliveries: int) -> Shape:
        big = min(BIG_MAX_SLIPS, max(1, deliveries // 20_000))
        rest = max(0, deliveries - big * BIG_FAMILIES - OPEN_MAILINGS * OPEN_SIZE)
        return cls(big, max(1, round(rest / MEAN_MAILING)), OPEN_MAILINGS)


# The plan: one row per mailing, ids in time order. Groups: 'o' the other schools' mailings,
# 'b' the big school's slips, 'p' the open (paused) broadcasts.
PLAN_SQL = """
    CREATE TEMP TABLE hist_plan AS
    WITH raw AS (
        SELECT 'o'::text AS grp, k, 2 + mod(k, %(others)s) AS school_id,
               50 + mod(k * 37, 101) AS size,
               %(t0)s::timestamptz + ((k + 0.5) / %(om)s)::float8 * interval '365 days' AS at,
               mod(k * 131, %(ofam)s) AS off
        FROM generate_series(0, %(om)s - 1) AS k
        UNION ALL
        SELECT 'b', j, %(big)s, %(bfam)s,
               %(t0)s::timestamptz + ((j + 0.25) / %(bm)s)::float8 * interval '365 days', 0
        FROM generate_series(0, %(bm)s - 1) AS j
        UNION ALL
        SELECT 'p', q, 2 + mod(q, %(others)s), %(psize)s,
               %(now)s::timestamptz - interval '3 hours' + q * interval '20 minutes',
               mod(q * 97, %(ofam)s)
        FROM generate_series(0, %(pm)s - 1) AS q
    )
    SELECT row_number() OVER (ORDER BY at, grp, k) AS id, raw.*,
           CASE WHEN grp = 'b' OR (grp = 'o' AND mod(k, 3) = 0) THEN 'slip'
                ELSE 'broadcast' END AS kind,
           CASE WHEN grp = 'p' THEN 'paused'
                WHEN grp = 'o' AND mod(k, 100) = 37 THEN 'cancelled'
                ELSE 'completed' END AS mstatus
    FROM raw
"""

MAILINGS_PLAN_SQL = """
    CREATE TEMP TABLE hist_mailings AS
    SELECT p.*,
           CASE WHEN kind = 'slip' THEN row_number() OVER (PARTITION BY kind ORDER BY id)
           END AS slip_id,
           CASE WHEN kind = 'broadcast' THEN row_number() OVER (PARTITION BY kind ORDER BY id)
           END AS broadcast_id,
           CASE WHEN mstatus = 'paused' THEN NULL ELSE at + interval '5 minutes'
           END AS completed_at,
           CASE mstatus WHEN 'completed' THEN 'sent' ELSE mstatus END AS source_status
    FROM hist_plan p
"""

BODY = (
    "Dear families,\n\nThis is one of the year's messages from the school: dates, what to "
    "bring, whom to ask. Please read it to the end and answer by the date it gives, if it "
    "asks for an answer.\n\nThank you,\nThe office"
)

SOURCES_SQL = (
    """
    INSERT INTO slips_slip (id, title, body, send_at, status, dispatched_at, completed_at,
                            created_at, updated_at, consent_question, free_text_question,
                            due_at, audience_id, created_by_id, school_id)
    SELECT slip_id, 'Excursion ' || id, %(body)s, at, source_status, at, completed_at,
           at - interval '1 day', coalesce(completed_at, at), 'Do you give consent?', '',
           at + interval '7 days', school_id,
           CASE WHEN school_id = %(big)s THEN %(staff)s END, school_id
    FROM hist_mailings WHERE kind = 'slip' ORDER BY id
    """,
    """
    INSERT INTO slips_broadcast (id, title, body, send_at, status, dispatched_at,
                                 completed_at, created_at, updated_at, audience_id,
                                 created_by_id, school_id, urgent)
    SELECT broadcast_id, 'News ' || id, %(body)s, at, source_status, at, completed_at,
           at - interval '1 day', coalesce(completed_at, at), school_id, NULL, school_id, false
    FROM hist_mailings WHERE kind = 'broadcast' ORDER BY id
    """,
    """
    INSERT INTO notifications_mailing (id, kind, round, status, subject, body,
                                       recipient_count, created_at, completed_at,
                                       broadcast_id, school_id, slip_id, urgent, summarised)
    SELECT id, kind, 0, mstatus,
           CASE WHEN kind = 'slip' THEN 'Excursion ' ELSE 'News ' END || id, %(body)s,
           size, at, completed_at, broadcast_id, school_id, slip_id, false, false
    FROM hist_mailings ORDER BY id
    """,
)

# One row per (mailing, n < size), its status drawn from a hash of both: see the docstring.
DELIVERIES_SQL = """
    INSERT INTO notifications_delivery (
        mailing_id, school_id, email, email_normalized, recipient_name, guardian_ids,
        student_ids, status, attempt, tries, lease_until, next_attempt_at, message_id_header,
        provider_id, last_error, created_at, updated_at, submitted_at, sent_at, opened_at,
        lost_claims, throttles, accepted)
    SELECT m.id, m.school_id, x.addr, x.addr, 'Parent ' || x.fam,
           jsonb_build_array(x.person), jsonb_build_array(x.person),
           s.status,
           CASE WHEN s.submitted THEN 1 + s.retried::int ELSE 0 END,
           CASE WHEN s.submitted THEN 1 + s.retried::int ELSE 0 END,
           NULL, NULL,
           CASE WHEN s.submitted THEN '<d' || m.id || '.' || g.n || '@edsmart.localhost>'
                ELSE '' END,
           CASE WHEN s.status = 'sent' AND NOT s.resolved THEN 'q' || m.id || 'x' || g.n
                ELSE '' END,
           CASE s.status WHEN 'failed' THEN '550 5.1.1 mailbox unavailable'
                         WHEN 'skipped' THEN 'address suppressed after a hard bounce'
                         WHEN 'unknown' THEN 'no reply before the submit lease expired'
                         ELSE '' END,
           m.at,
           CASE s.status
                WHEN 'sent' THEN x.t + CASE WHEN s.resolved THEN interval '1 hour'
                                            WHEN s.retried THEN interval '90 seconds'
                                            ELSE interval '0' END
                WHEN 'failed' THEN x.t
                WHEN 'unknown' THEN x.t + interval '70 seconds'
                WHEN 'cancelled' THEN m.at + interval '2 minutes'
                ELSE m.at END,
           CASE WHEN s.submitted THEN x.t - interval '300 milliseconds'
                + CASE WHEN s.retried THEN interval '90 seconds' ELSE interval '0' END END,
           CASE WHEN s.status = 'sent' THEN x.t
                + CASE WHEN s.retried THEN interval '90 seconds' ELSE interval '0' END END,
           CASE WHEN s.opened THEN x.t + make_interval(secs => (120 + mod(x.h, 7200))::float8)
                END,
           0, 0, (s.status = 'sent')::int
    FROM (SELECT * FROM hist_mailings WHERE id BETWEEN %(lo)s AND %(hi)s ORDER BY id) AS m
    CROSS JOIN LATERAL generate_series(0, m.size - 1) AS g(n)
    CROSS JOIN LATERAL (
        SELECT mod(abs(hashint8(m.id * 1000 + g.n)), 10000) AS h,
               mod(m.off + g.n, CASE WHEN m.school_id = %(big)s THEN %(bfam)s
                                     ELSE %(ofam)s END) AS fam,
               m.at + make_interval(secs => (5 + g.n * 0.5)::float8) AS t
    ) AS x0
    CROSS JOIN LATERAL (
        SELECT x0.h, x0.fam, x0.t, 'p' || x0.fam || '@s' || m.school_id || '.example' AS addr,
               CASE WHEN m.school_id = %(big)s THEN x0.fam + 1
                    ELSE 1000000 + m.school_id * 1000 + x0.fam END AS person
    ) AS x
    CROSS JOIN LATERAL (
        SELECT CASE
            WHEN m.grp = 'p' THEN CASE WHEN g.n < m.size / 2 THEN 'sent' ELSE 'pending' END
            WHEN m.mstatus = 'cancelled' AND g.n >= m.size / 2 THEN 'cancelled'
            WHEN m.grp = 'o' AND m.k >= %(om)s - %(unknowns)s AND m.mstatus = 'completed'
                 AND g.n = 0 THEN 'unknown'
            WHEN x.h < 9750 THEN 'sent'
            WHEN x.h < 9900 THEN 'failed'
            ELSE 'skipped' END AS status
    ) AS s0
    CROSS JOIN LATERAL (
        SELECT s0.status,
               s0.status IN ('sent', 'failed', 'unknown') AS submitted,
               s0.status = 'sent' AND mod(x.h, 50) = 1 AS retried,
               s0.status = 'sent' AND mod(x.h, 5000) = 3 AS resolved,
               s0.status = 'sent'
                   AND mod(abs(hashint8(m.id * 1000 + g.n + 777)), 10) < 4 AS opened
    ) AS s
"""

# The rows that have events, found in one scan; then their events, in time order.
EVENT_ROWS_SQL = """
    CREATE TEMP TABLE hist_event_rows AS
    SELECT id, school_id, mailing_id, status, attempt, provider_id, last_error, updated_at,
           sent_at
    FROM notifications_delivery
    WHERE status IN ('failed', 'cancelled', 'unknown')
       OR (status = 'sent' AND (attempt = 2 OR provider_id = ''))
"""

EVENTS_SQL = """
    INSERT INTO notifications_deliveryevent (delivery_id, school_id, mailing_id, attempt,
                                             from_status, to_status, detail, actor, at)
    SELECT * FROM (
        SELECT id, school_id, mailing_id, 1, 'submitting', 'failed', last_error, '', updated_at
        FROM hist_event_rows WHERE status = 'failed'
        UNION ALL
        SELECT id, school_id, mailing_id, 0, 'pending', 'cancelled', 'message cancelled',
               'history-staff', updated_at
        FROM hist_event_rows WHERE status = 'cancelled'
        UNION ALL
        SELECT id, school_id, mailing_id, 1, 'submitting', 'unknown', last_error, '', updated_at
        FROM hist_event_rows WHERE status = 'unknown'
        UNION ALL
        SELECT id, school_id, mailing_id, 1, 'submitting', 'retry_wait',
               '451 4.7.1 try again later', '', sent_at - interval '90 seconds'
        FROM hist_event_rows WHERE status = 'sent' AND attempt = 2
        UNION ALL
        SELECT id, school_id, mailing_id, 1, 'submitting', 'unknown',
               'no reply before the submit lease expired', '', sent_at + interval '70 seconds'
        FROM hist_event_rows WHERE status = 'sent' AND provider_id = ''
        UNION ALL
        SELECT id, school_id, mailing_id, 1, 'unknown', 'sent',
               'resolved as sent: the parent has it', 'history-root', updated_at
        FROM hist_event_rows WHERE status = 'sent' AND provider_id = ''
    ) AS e (delivery_id, school_id, mailing_id, attempt, from_status, to_status, detail,
            actor, at)
    ORDER BY at, delivery_id
"""

RESPONSES_SQL = """
    INSERT INTO slips_response (school_id, slip_id, student_id, guardian_id, consent, answer,
                                answered_at, recorded_by_id)
    SELECT %(big)s, m.slip_id, st, st, mod(abs(hashint8(m.slip_id * 1000 + st)), 10) < 8, '',
           m.at + st * interval '3 minutes', NULL
    FROM hist_mailings m CROSS JOIN generate_series(1, %(bfam)s) AS st
    WHERE m.grp = 'b'
    ORDER BY m.at, st
"""

# Summarised all at once here, but over the year by the sweep, seconds after each completion:
# reads that look at what was summarised in a recent window must find the year spread out.
SUMMARISED_AT_SQL = """
    UPDATE notifications_mailingsummary s
    SET summarised_at = m.completed_at + interval '5 seconds'
    FROM notifications_mailing m
    WHERE m.id = s.mailing_id AND m.completed_at IS NOT NULL
"""

SECONDARY_INDEXES_SQL = """
    SELECT i.indexname, i.indexdef FROM pg_indexes i
    WHERE i.schemaname = 'public' AND i.tablename = ANY(%(tables)s)
      AND NOT EXISTS (SELECT 1 FROM pg_constraint c
                      WHERE c.conindid = format('%%I', i.indexname)::regclass)
    ORDER BY i.tablename, i.indexname
"""


@dataclass
class Build:
    """A complete build of the full database, as its marker records it."""

    deliveries: int
    schools: int
    seconds: float
    summarise_seconds: float
    phases: list[tuple[str, float]] = field(default_factory=list)
    built_at: dt.datetime | None = None


def marker_read() -> Build | None:
    exists = fetch("SELECT to_regclass(%(t)s) IS NOT NULL", {"t": MARKER_TABLE})[0][0]
    if not exists:
        return None
    rows = fetch(
        f"SELECT deliveries, schools, seconds, summarise_seconds, built_at, version "  # noqa: S608
        f"FROM {MARKER_TABLE}"
    )
    if not rows:
        return None
    deliveries, schools, seconds, summarise, built_at, version = rows[0]
    if version != BUILD_VERSION:
        return None
    return Build(deliveries, schools, seconds, summarise, built_at=built_at)


def marker_write(build: Build) -> None:
    run_sql(
        f"CREATE TABLE {MARKER_TABLE} (version int, deliveries bigint, schools int, "
        "seconds float8, summarise_seconds float8, built_at timestamptz)"
    )
    run_sql(
        f"INSERT INTO {MARKER_TABLE} VALUES (%(v)s, %(d)s, %(s)s, %(sec)s, %(sum)s, now())",  # noqa: S608
        {
            "v": BUILD_VERSION,
            "d": build.deliveries,
            "s": build.schools,
            "sec": build.seconds,
            "sum": build.summarise_seconds,
        },
    )


class Phases:
    """Times each phase of the build, printed as it ends."""

    def __init__(self) -> None:
        self.done: list[tuple[str, float]] = []

    @contextlib.contextmanager
    def __call__(self, name: str) -> Any:
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.done.append((name, seconds))
        say(f"  {name}: {seconds:.1f} s")


def build_history(opts: Options, env: dict[str, str]) -> Build:
    """The full database from nothing: created, migrated, the base, then the history."""
    from django.utils import timezone

    from notifications.summaries import mailings_summarise

    shape = Shape.of(opts.deliveries)
    say(
        f"building {opts.full_db}: {opts.schools} schools, {shape.other_mailings} mailings of "
        f"~{MEAN_MAILING}, the big school's {shape.big_mailings} slips of {BIG_FAMILIES}, "
        f"{shape.open_mailings} open mailings of {OPEN_SIZE}"
    )
    started = time.perf_counter()
    phase = Phases()
    with phase("create and migrate"):
        recreate_and_migrate(opts.full_db, env)
        use_database(opts.full_db)
    with phase("base"):
        seed_base(opts.schools)

    now = timezone.now()
    params: dict[str, Any] = {
        "others": opts.schools - 1,
        "om": shape.other_mailings,
        "bm": shape.big_mailings,
        "pm": shape.open_mailings,
        "ofam": OTHER_FAMILIES,
        "bfam": BIG_FAMILIES,
        "psize": OPEN_SIZE,
        "big": BIG_SCHOOL,
        "staff": STAFF_USER,
        "unknowns": UNKNOWN_ROWS,
        "t0": now - dt.timedelta(days=365),
        "now": now,
        "body": BODY,
    }
    # A bulk load's session: big sorts for the index builds, no wait for the WAL flush at each
    # commit, and no foreign-key trigger per row (the rows reference what this build inserted).
    run_sql("SET maintenance_work_mem = '1GB'")
    run_sql("SET work_mem = '256MB'")
    run_sql("SET synchronous_commit = off")
    run_sql("SET session_replication_role = replica")
    with phase("drop secondary indexes"):
        indexes = fetch(SECONDARY_INDEXES_SQL, {"tables": list(BULK_TABLES)})
        for name, _ in indexes:
            run_sql(f'DROP INDEX "{name}"')
        say(f"    dropped {', '.join(name for name, _ in indexes)}")
    with phase("plan, slips, broadcasts, mailings"):
        run_sql(PLAN_SQL, params)
        run_sql(MAILINGS_PLAN_SQL)
        run_sql("CREATE INDEX ON hist_mailings (id)")
        run_sql("ANALYZE hist_mailings")
        for sql in SOURCES_SQL:
            run_sql(sql, params)
    with phase("deliveries"):
        top = fetch("SELECT max(id) FROM hist_mailings")[0][0]
        inserted, loading = 0, time.perf_counter()
        for lo in range(1, top + 1, CHUNK_MAILINGS):
            hi = lo + CHUNK_MAILINGS - 1
            inserted += run_sql(DELIVERIES_SQL, {**params, "lo": lo, "hi": hi})
            rate = inserted / (time.perf_counter() - loading)
            say(f"    mailings up to {min(hi, top)} of {top}: {inserted} deliveries ({rate:.0f}/s)")
    with phase("events"):
        run_sql(EVENT_ROWS_SQL)
        run_sql(EVENTS_SQL)
    with phase("responses"):
        run_sql(RESPONSES_SQL, params)
    run_sql("RESET session_replication_role")
    with phase("recreate secondary indexes"):
        for name, definition in indexes:
            index_started = time.perf_counter()
            run_sql(definition)
            say(f"    {name}: {time.perf_counter() - index_started:.1f} s")
    with phase("sequences and ANALYZE"):
        sequences_fix()
        run_sql("ANALYZE")
    run_sql("RESET ALL")
    with phase("summarise (notifications.summaries.mailings_summarise)"):
        summarised = len(mailings_summarise())
    summarise_seconds = phase.done[-1][1]
    say(f"    {summarised} mailings summarised")
    with phase("summaries dated as the sweep would have"):
        run_sql(SUMMARISED_AT_SQL)
    with phase("VACUUM ANALYZE"):
        run_sql("DROP TABLE hist_event_rows, hist_mailings, hist_plan")
        run_sql("VACUUM ANALYZE")
    build = Build(
        deliveries=opts.deliveries,
        schools=opts.schools,
        seconds=time.perf_counter() - started,
        summarise_seconds=summarise_seconds,
        phases=phase.done,
    )
    marker_write(build)
    return build


def ensure_full(opts: Options, env: dict[str, str]) -> Build:
    """The kept full database when it is complete and of these parameters; else a new one."""
    import psycopg

    from bench.send_throughput import ADMIN_DATABASE_URL

    with psycopg.connect(ADMIN_DATABASE_URL, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (opts.full_db,)
        ).fetchone()
    kept = None
    if exists and not opts.rebuild:
        use_database(opts.full_db)
        kept = marker_read()
        if kept is None:
            say(f"{opts.full_db} holds no complete build of version {BUILD_VERSION}: rebuilding")
        elif (kept.deliveries, kept.schools) != (opts.deliveries, opts.schools):
            say(
                f"{opts.full_db} was built with --deliveries {kept.deliveries} --schools "
                f"{kept.schools}: rebuilding"
            )
            kept = None
    if kept is None:
        return build_history(opts, env)
    say(
        f"keeping {opts.full_db} (built {kept.built_at:%Y-%m-%d %H:%M} in {kept.seconds:.0f} s; "
        "--rebuild builds it again); migrating it"
    )
    db_forget()
    migrate(opts.full_db, env)
    return kept


def counts() -> dict[str, int]:
    tables = {
        "deliveries": "notifications_delivery",
        "events": "notifications_deliveryevent",
        "mailings": "notifications_mailing",
        "summaries": "notifications_mailingsummary",
        "slips": "slips_slip",
        "broadcasts": "slips_broadcast",
        "responses": "slips_response",
    }
    return {
        name: fetch(f"SELECT count(*) FROM {table}")[0][0]  # noqa: S608 - constant names
        for name, table in tables.items()
    }


def statuses() -> str:
    rows = fetch("SELECT status, count(*) FROM notifications_delivery GROUP BY 1 ORDER BY 2 DESC")
    return ", ".join(f"{status} {n}" for status, n in rows)


# --- measuring -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    key: str
    label: str
    bound_ms: float | None = None  # on the full database
    ratio_bound: float | None = None  # full / empty
    # A page of one message of the big school, which the empty database does not have.
    full_only: bool = False


SPECS = (
    Spec("watch", "watch pass: alerts.watch()", bound_ms=100),
    Spec("metrics", "GET /metrics (bearer token)", bound_ms=100),
    Spec("ops", "GET /ops/ as superuser", bound_ms=100),
    Spec("report", "delivery_report --json", bound_ms=300),
    Spec("staff_deliveries", "staff: admin deliveries list", bound_ms=200),
    Spec("staff_mailings", "staff: admin mailings list", bound_ms=200),
    Spec("staff_responses", "staff: admin responses list", bound_ms=200),
    Spec("root_deliveries", "superuser: admin deliveries list"),
    Spec("root_mailings", "superuser: admin mailings list"),
    Spec("root_responses", "superuser: admin responses list"),
    Spec("staff_search", f"staff: deliveries ?q={SEARCHED}"),
    # Polled every 2.5 s by each staff member's open home page while something sends.
    Spec("staff_home", "staff: home status.json", bound_ms=100),
    Spec("root_home", "superuser: home status.json (all schools)", bound_ms=200),
    Spec("staff_index", "staff: admin home page", bound_ms=200),
    Spec("staff_slip", "staff: newest slip's page (reach, log)", bound_ms=300, full_only=True),
    Spec("staff_evidence", "staff: evidence page of a mailing", bound_ms=200, full_only=True),
    Spec("evidence_csv", "evidence CSV of that mailing", bound_ms=300, full_only=True),
    Spec("provider_match", "a provider event matched by provider id", bound_ms=100),
    Spec("send", "new 200-family broadcast, due -> recorded", ratio_bound=SEND_RATIO_BOUND),
)


@dataclass
class Timing:
    median_ms: float | None = None
    runs: int = 0
    error: str | None = None
    note: str = ""

    def show(self) -> str:
        if self.error is not None:
            return "ERROR"
        if self.median_ms is None:
            return "-"
        return f"{self.median_ms:.1f}" + ("" if self.runs >= 2 else f" (n={self.runs})")


class PageError(Exception):
    """A page answered something other than 200."""


def measure(fn: Callable[[], object], reps: int, budget: float) -> Timing:
    """One warm-up, then the median of ``reps`` runs (fewer if they would overrun
    ``budget`` seconds: a page that takes a minute is not made better by five of them)."""
    try:
        start = time.perf_counter()
        fn()
        warm = time.perf_counter() - start
        runs = reps if warm * reps <= budget else max(1, int(budget // max(warm, 1e-6)))
        samples = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    except Exception:  # noqa: BLE001 - reported with its traceback, the bench goes on
        return Timing(error=traceback.format_exc())
    note = f"{runs} of {reps} runs (warm-up took {warm:.1f} s)" if runs < reps else ""
    return Timing(statistics.median(samples) * 1000, runs, note=note)


def page(client: Any, url: str, **headers: str) -> Callable[[], bytes]:
    def get() -> bytes:
        response = client.get(url, secure=True, headers=headers)
        if response.status_code != 200:
            raise PageError(
                f"GET {url} answered {response.status_code}: {response.content[:500]!r}"
            )
        return response.content

    return get


def delivery_report() -> str:
    from django.core.management import call_command

    out = io.StringIO()
    call_command("delivery_report", json=True, stdout=out)
    return out.getvalue()


def in_process_items() -> dict[str, Callable[[], object]]:
    """Every item but the send, bound to the current database's users."""
    from django.contrib.auth import get_user_model
    from django.test import Client

    from notifications import alerts

    user_model = get_user_model()
    root, staff = Client(), Client()
    root.force_login(user_model.objects.get(pk=ROOT_USER))
    staff.force_login(user_model.objects.get(pk=STAFF_USER))
    lists = {
        "deliveries": "/admin/notifications/delivery/",
        "mailings": "/admin/notifications/mailing/",
        "responses": "/admin/slips/response/",
    }
    items: dict[str, Callable[[], object]] = {
        "watch": alerts.watch,
        "metrics": page(root, "/metrics", Authorization=f"Bearer {METRICS_TOKEN}"),
        "ops": page(root, "/ops/"),
        "report": delivery_report,
    }
    for name, url in lists.items():
        items[f"staff_{name}"] = page(staff, url)
        items[f"root_{name}"] = page(root, url)
    items["staff_search"] = page(staff, f"/admin/notifications/delivery/?q={SEARCHED}")
    items["staff_home"] = page(staff, "/admin/home/status.json")
    items["root_home"] = page(root, "/admin/home/status.json")
    items["staff_index"] = page(staff, "/admin/")
    items["provider_match"] = provider_match
    slip, mailing = newest_slip_and_mailing()
    if slip is not None:
        items["staff_slip"] = page(staff, f"/admin/slips/slip/{slip}/change/")
    if mailing is not None:
        evidence = f"/admin/notifications/mailing/{mailing}/evidence"
        items["staff_evidence"] = page(staff, f"{evidence}/")
        items["evidence_csv"] = streamed(staff, f"{evidence}.csv")
    return items


def newest_slip_and_mailing() -> tuple[int | None, int | None]:
    """The big school's newest slip, and its newest mailing (none on the empty database)."""
    from notifications.models import Mailing
    from slips.models import Slip

    slip = Slip.objects.filter(school_id=BIG_SCHOOL).order_by("-pk").values_list("pk", flat=True)
    mailing = Mailing.objects.filter(school_id=BIG_SCHOOL).order_by("-pk")
    return slip.first(), mailing.values_list("pk", flat=True).first()


def streamed(client: Any, url: str) -> Callable[[], int]:
    def get() -> int:
        response = client.get(url, secure=True)
        if response.status_code != 200:
            raise PageError(f"GET {url} answered {response.status_code}")
        return sum(len(chunk) for chunk in response.streaming_content)

    return get


def provider_match() -> object:
    """A bounce reported by the provider's own message id (Postmark's, say): no Message-ID
    and no metadata, so it is found through the last 45 days' mailings and the address."""
    from anymail.signals import AnymailTrackingEvent

    from notifications.provider_events import delivery_match

    event = AnymailTrackingEvent(
        event_type="bounced", message_id="provider-id-not-in-history", recipient=SEARCHED
    )
    return delivery_match(event)


def forget_alerts_and_heartbeats() -> None:
    """Both databases start each measurement with no alert and no heartbeat."""
    from notifications.models import Alert, Heartbeat

    Alert.objects.all().delete()
    Heartbeat.objects.all().delete()


# --- the new send ----------------------------------------------------------------------------


@dataclass
class Stack:
    """The private services every send goes through: Redis, the sink, the roles' settings."""

    workdir: Path
    redis: PrivateRedis
    sink: Sink
    env: dict[str, str]  # the roles' (and this process's) settings, but the database


def broadcast_scheduled(number: int) -> int:
    """A broadcast to the big school's families, scheduled for tomorrow (off the clock)."""
    from django.db import transaction
    from django.utils import timezone

    from slips.models import Broadcast, SendStatus
    from slips.services import message_schedule

    with transaction.atomic():
        broadcast = Broadcast.objects.create(
            school_id=BIG_SCHOOL,
            title=f"{SEND_TITLE} {number}",
            body=BODY,
            audience_id=BIG_SCHOOL,
            status=SendStatus.DRAFT,
            created_by_id=STAFF_USER,
        )
        message_schedule(message=broadcast, send_at=timezone.now() + dt.timedelta(days=1))
    return broadcast.pk


def send_once(number: int) -> float:
    """Seconds from "due" to the last of the broadcast's deliveries recorded as terminal."""
    from django.db.models import Max
    from django.utils import timezone

    from notifications.models import Delivery, Mailing
    from notifications.tasks import dispatch_due
    from slips.models import Broadcast, SendStatus

    pk = broadcast_scheduled(number)
    due = timezone.now()
    Broadcast.objects.filter(pk=pk, status=SendStatus.SCHEDULED).update(send_at=due, updated_at=due)
    dispatch_due.delay()  # as beat would within EDSMART_DISPATCH_INTERVAL_SECONDS

    def done() -> int | None:
        mailing = Mailing.objects.filter(broadcast_id=pk).values_list("pk", flat=True).first()
        if mailing is None:
            return None
        rows = Delivery.objects.filter(mailing_id=mailing)
        if rows.count() < BIG_FAMILIES or rows.filter(status__in=OPEN_STATUSES).exists():
            return None
        return mailing

    mailing = wait_for(done, timeout=SEND_TIMEOUT, what=f"send {number} terminal", interval=0.05)
    rows = Delivery.objects.filter(mailing_id=mailing)
    not_sent = rows.exclude(status="sent").count()
    if not_sent:
        raise BenchError(f"send {number}: {not_sent} of its deliveries are not sent")
    last = rows.aggregate(last=Max("updated_at"))["last"]
    return (last - due).total_seconds()


def measure_send(name: str, stack: Stack, warmups: int, reps: int) -> Timing:
    """The roles started against database ``name``, one warm-up send, ``reps`` measured."""
    import redis as redis_lib

    redis_lib.Redis.from_url(stack.redis.url).flushall()
    workdir = stack.workdir / name
    workdir.mkdir(exist_ok=True)
    roles = Roles(workdir, child_env({**stack.env, "DATABASE_URL": database_url(name)}))
    try:
        worker = roles.worker("w1")
        beat = roles.beat("beat1")
        roles.wait_ready(worker)
        wait_for(lambda: beat_ticking(beat.log_path), timeout=60, what="beat", interval=0.2)
        for i in range(warmups):
            send_once(i + 1)
        samples = [send_once(warmups + i + 1) for i in range(reps)]
        return Timing(statistics.median(samples) * 1000, reps, note=samples_note(samples))
    except Exception:  # noqa: BLE001 - reported with its traceback and the roles' logs
        return Timing(error=traceback.format_exc() + "\n" + roles.tails(15))
    finally:
        roles.stop_all()
        sends_forget()


def samples_note(samples: list[float]) -> str:
    return "runs " + ", ".join(f"{s * 1000:.0f}" for s in samples) + " ms"


def sends_forget() -> None:
    """The bench's own broadcasts go again (mailings, deliveries, events with them), so the
    kept history stays the history."""
    from slips.models import Broadcast

    Broadcast.objects.filter(title__startswith=SEND_TITLE).delete()


# --- EXPLAIN ---------------------------------------------------------------------------------

WRITE = re.compile(r"\b(INSERT|UPDATE|DELETE|FOR\s+UPDATE|FOR\s+NO\s+KEY\s+UPDATE)\b", re.I)


def shape_of(sql: str) -> str:
    """A query with its literals blanked, so that a query run per row is explained once."""
    return re.sub(r"\b\d+\b", "N", re.sub(r"'(?:[^']|'')*'", "'?'", sql))


def explain(fn: Callable[[], object]) -> list[str]:
    """Every query of ``fn`` over 5 ms, grouped by shape, with the plan of the slowest."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    out: list[str] = []
    with CaptureQueriesContext(connection) as captured:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - the table reports it; the plans still help
            out.append(f"  (it raised {type(exc).__name__}: {exc})")
    queries = captured.captured_queries
    total = sum(float(q["time"]) for q in queries)
    out.append(f"  {len(queries)} queries, {total * 1000:.1f} ms in the database")
    groups: dict[str, list[tuple[float, str]]] = {}
    for q in queries:
        seconds = float(q["time"])
        if seconds > SLOW_QUERY_SECONDS:
            groups.setdefault(shape_of(q["sql"]), []).append((seconds, q["sql"]))
    if not groups:
        out.append(f"  no query over {SLOW_QUERY_SECONDS * 1000:.0f} ms")
    ranked = sorted(groups.values(), key=lambda g: -sum(s for s, _ in g))
    for group in ranked:
        slowest, sql = max(group)
        out.append(
            f"  -- {len(group)} x over {SLOW_QUERY_SECONDS * 1000:.0f} ms, "
            f"{sum(s for s, _ in group) * 1000:.1f} ms in all, slowest {slowest * 1000:.1f} ms:"
        )
        flat = " ".join(sql.split())
        out.append("  " + (flat if len(flat) <= 1500 else flat[:1500] + " ..."))
        head = sql.lstrip().upper()
        if not (head.startswith(("SELECT", "WITH"))) or WRITE.search(sql):
            out.append("  (not a read: not explained)")
            continue
        try:
            plan = fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}")
        except Exception as exc:  # noqa: BLE001 - say so and go on with the next
            out.append(f"  (EXPLAIN failed: {exc})")
            db_forget()
            continue
        out += [f"    {line}" for (line,) in plan]
    return out


# --- the run ---------------------------------------------------------------------------------


def measure_database(name: str, opts: Options, stack: Stack) -> dict[str, Timing]:
    use_database(name)
    forget_alerts_and_heartbeats()
    import redis as redis_lib

    redis_lib.Redis.from_url(stack.redis.url).flushall()
    results: dict[str, Timing] = {
        spec.key: Timing(note="the full database only") for spec in SPECS if spec.full_only
    }
    for key, fn in in_process_items().items():
        results[key] = timing = measure(fn, opts.reps, opts.budget)
        if key == "staff_search" and timing.error is None:
            # The search box repeats it: compare with the empty database's page.
            shown = fn().count(SEARCHED.encode())
            timing.note = f"the address appears {shown} times on the page"
        say(f"  {name}: {key} {timing.show()} ms {timing.note}".rstrip())
    say(f"  {name}: send (a worker and beat starting)")
    results["send"] = timing = measure_send(name, stack, warmups=1, reps=opts.send_reps)
    say(f"  {name}: send {timing.show()} ms {timing.note}".rstrip())
    return results


def explain_all() -> list[str]:
    lines = ["", "================ EXPLAIN (full database, queries over 5 ms) ================"]
    for key, fn in in_process_items().items():
        spec = next(s for s in SPECS if s.key == key)
        lines.append(f"-- {spec.label}")
        lines += explain(fn)
    lines.append(
        f"-- {next(s for s in SPECS if s.key == 'send').label}: its steps run here, in this "
        "process, as the worker runs them (dispatch_due, turns_send, sweep)"
    )
    lines += explain(send_in_process)
    sends_forget()  # not in what is explained: it is the bench's, not the send's
    return lines


def send_in_process() -> None:
    """One new send's database work, done in this process so that its queries can be
    captured: the worker's steps in order, against the same sink. Its broadcast is deleted
    afterwards by the caller; the nudges it publishes are never consumed (no worker runs)."""
    from django.utils import timezone

    from notifications import batch, dispatch, sweep
    from notifications.models import Mailing
    from slips.models import Broadcast, SendStatus

    pk = broadcast_scheduled(0)
    now = timezone.now()
    Broadcast.objects.filter(pk=pk, status=SendStatus.SCHEDULED).update(send_at=now, updated_at=now)
    dispatch.dispatch_due()
    mailing = Mailing.objects.get(broadcast_id=pk)
    batch.turns_send(hint=mailing.pk)
    sweep.sweep()


def verdict(spec: Spec, empty: Timing, full: Timing) -> tuple[str, str, bool]:
    """(bound as shown, verdict, missed)."""
    if spec.bound_ms is not None:
        bound = f"<= {spec.bound_ms:.0f} ms"
    elif spec.ratio_bound is not None:
        bound = f"<= {spec.ratio_bound:g} x empty"
    else:
        bound = "report only"
    if (not spec.full_only and empty.error is not None) or full.error is not None:
        return bound, "ERROR", True
    if full.median_ms is None or (empty.median_ms is None and not spec.full_only):
        return bound, "ERROR (not measured)", True
    assert full.median_ms is not None
    if spec.bound_ms is not None:
        met = full.median_ms <= spec.bound_ms
    elif spec.ratio_bound is not None:
        met = full.median_ms <= spec.ratio_bound * empty.median_ms
    else:
        return bound, "-", False
    return bound, "met" if met else "MISSED", not met


def table(results: dict[str, dict[str, Timing]]) -> tuple[list[str], bool]:
    empty, full = results["empty"], results["full"]
    lines = [
        f"{'item':<44} {'empty ms':>10} {'full ms':>10} {'full/empty':>10}  {'bound':<16} verdict",
        "-" * 104,
    ]
    failed = False
    for spec in SPECS:
        e, f = empty[spec.key], full[spec.key]
        bound, word, missed = verdict(spec, e, f)
        failed |= missed
        ratio = (
            f"{f.median_ms / e.median_ms:.2f}"
            if e.median_ms and f.median_ms is not None and e.error is None and f.error is None
            else "-"
        )
        lines.append(
            f"{spec.label:<44} {e.show():>10} {f.show():>10} {ratio:>10}  {bound:<16} {word}"
        )
    return lines, failed


def errors(results: dict[str, dict[str, Timing]]) -> list[str]:
    out = []
    for db_key, timings in results.items():
        for key, timing in timings.items():
            if timing.error is not None:
                out += [f"---- {key} on the {db_key} database ----", timing.error.rstrip()]
    return out


def run(opts: Options, workdir: Path, stack_: contextlib.ExitStack) -> int:
    redis = PrivateRedis(workdir)
    stack_.callback(redis.stop)
    redis.start()
    sink = Sink(workdir)
    stack_.callback(sink.stop)
    env = roles_env(database_url(opts.full_db), redis.url, sink.port, {})
    own = {
        **env,
        "LOG_LEVEL": "WARNING",  # this process's own logs: quiet
        "ALLOWED_HOSTS": "localhost,testserver",
        "EDSMART_METRICS_TOKEN": METRICS_TOKEN,
    }
    django_setup(own)
    stack_.callback(db_forget)
    # Alerts raised here are expected (no beat, no worker while pages are measured), and
    # whitenoise misses a collectstatic directory that no page here needs.
    logging.getLogger("edsmart.alerts").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message="No directory at", module="django.core.handlers")
    # As tests/conftest.py's web_settings: no collectstatic manifest here, and the test client
    # speaks HTTPS (secure=True) to production's settings.
    from django.conf import settings
    from django.test.utils import override_settings

    override_settings(
        STORAGES={
            **settings.STORAGES,
            "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
        }
    ).enable()
    say(f"private Redis on port {redis.port}, SMTP sink on port {sink.port}; workdir {workdir}")

    build = ensure_full(opts, env)
    use_database(opts.full_db)
    built = counts()
    state = statuses()
    say(f"making {opts.empty_db} (migrated, the base, no history)")
    recreate_and_migrate(opts.empty_db, env)
    use_database(opts.empty_db)
    seed_base(opts.schools)

    stack = Stack(workdir, redis, sink, env)
    results: dict[str, dict[str, Timing]] = {}
    for key, name in (("empty", opts.empty_db), ("full", opts.full_db)):
        say(f"measuring {name}")
        results[key] = measure_database(name, opts, stack)
    plans = explain_all() if opts.explain else []

    lines = ["", *run_header("history.py"), ""]
    if build.phases:
        lines.append(f"build of {opts.full_db}: {build.seconds:.0f} s")
        lines += [f"  {name}: {seconds:.1f} s" for name, seconds in build.phases]
    else:
        lines.append(
            f"build of {opts.full_db}: kept from {build.built_at:%Y-%m-%d %H:%M} "
            f"(took {build.seconds:.0f} s, of which summarising {build.summarise_seconds:.1f} s)"
        )
    lines.append(f"summarising every closed mailing: {build.summarise_seconds:.1f} s")
    lines.append(
        f"full database: --deliveries {opts.deliveries} --schools {opts.schools}: "
        + ", ".join(f"{name} {n}" for name, n in built.items())
    )
    lines.append(f"  delivery statuses: {state}")
    lines.append(
        f"medians of {opts.reps} runs after one warm-up (the send: {opts.send_reps} after one)"
    )
    lines.append("")
    rows, failed = table(results)
    lines += rows
    notes = [
        f"  {spec.label} on {db}: {results[db][spec.key].note}"
        for spec in SPECS
        for db in ("empty", "full")
        if results[db][spec.key].note
    ]
    if notes:
        lines += ["", "notes:", *notes]
    sink_count = sink.count()
    lines.append(f"SMTP sink: {sink_count} recipients accepted in all")
    trouble = errors(results)
    if trouble:
        print("\n".join(["", "================ errors ================", *trouble]))
    print("\n".join(plans + lines), flush=True)
    print("OK: every bound met" if not failed else "FAIL: a bound missed or an item failed")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    return run_in_workdir(lambda workdir, stack: run(opts, workdir, stack), name="history")


if __name__ == "__main__":
    sys.exit(main())
