"""Peak hour: one big school's bulk, nineteen small slips and an urgent broadcast at once.

    .venv/bin/python bench/peak.py [--rate 0] [--scale 1.0] [--seed 1] [--both]
        [--timeout SECONDS] [--set NAME=VALUE ...] [--keep]

Why: at peak a big school can have ten broadcasts, 200,000 emails, due at the same moment.
Sent in arrival order, a small school's 40-family slip that falls due five seconds later waits
for all of them, and so does a closure notice. The pipeline answers with fair share (claims
take turns across schools, then across a school's messages), urgent broadcasts
(``Broadcast.urgent``, copied to ``Mailing.urgent``: they go before everything normal) and one
global send rate for every worker (``EDSMART_SEND_RATE``, emails/s, shared through Redis, as
providers cap an account's rate). This bench measures what a family waits for at peak, per
school and per message, and whether the cap holds at the mail server, while checking that
nobody got an email twice or not at all.

Everything is private and on 127.0.0.1, from bench/soak.py's machinery: a throwaway PostgreSQL
cluster (migrated), a redis-server without persistence, and the recording SMTP sink
(``bench/smtp_sink.py --record``: one line per accepted recipient with the acceptance time and
the ``X-EdSmart-Delivery`` id). The roles run as production runs them: two ``celery worker -Q
periodic,send --concurrency 2`` with different node names (two hosts) and one ``celery beat``
(DatabaseScheduler), settings at their defaults but ``EDSMART_DISPATCH_INTERVAL_SECONDS=1``
and ``EDSMART_SEND_RATE=--rate`` (0: no cap), JSON logs at INFO into a temp dir.

What is seeded (one family = one guardian with an address of their own + one student):

- school 0, ``big``: ten broadcasts of 50,000, 40,000, 30,000, 25,000, 20,000, 10,000, 8,000,
  7,000, 5,000 and 5,000 recipients (200,000), each times ``--scale`` (at least 1); the school
  has as many families as the largest, which goes to the whole school, the others to explicit
  audiences of students drawn with ``--seed``;
- schools 1-19, ``small-01`` .. ``small-19``: 30-300 families each (drawn with ``--seed``, not
  scaled), one slip to the whole school (due date a week after its send time);
- school 20, ``urgent``, a 21st school of 1,000 families (not scaled): one broadcast to the
  whole school with ``urgent`` set. A school of its own, so that its figure is only its own and
  the nineteen small schools each have exactly one message.

Everything is scheduled at seeding for tomorrow; a message "falls due" when its ``send_at`` is
moved to now (as staff sending it now would). The timeline, from T0, once the roles are up and
beat is ticking:

- T0: the big school's ten broadcasts fall due;
- T0+5 s: the nineteen slips fall due, or earlier, as soon as 30% of the big school's emails
  are sent;
- T0+10 s: the urgent broadcast falls due, or earlier, as soon as 60% of them are sent;

so that at a small ``--scale`` the small slips and the urgent broadcast still land while the
bulk is sending (a warning is printed if the bulk was already done, and the report says how
many of the big school's emails were accepted after the urgent one fell due).

Then a bounded wait (``--timeout``, by default 1.3 x the emails over the cap, or over 50/s
uncapped, + 180 s) until every message is dispatched, every delivery terminal, every mailing
completed and the sink quiet for 3 s; the roles are stopped and the report is printed, from the
sink's record and the database:

- latency, per message: for each recipient, the time from the message's due time (its
  ``send_at``) to the acceptance of its email at the sink; per message: when it was dispatched
  (fanned out), first email, p50, p99 and max over its recipients (max = due -> last email,
  the figure a school sees). One line per small school, one per big broadcast plus the ten
  together, the urgent broadcast with its bound ``1000 / rate + 5 s`` when a rate is set
  (met/MISSED; informative, not part of the exit status), and over the nineteen slips: p50,
  p99 and max of their due -> last;
- rate: accepted / (last - first acceptance), and the busiest 1 s window at the sink (the
  most acceptances in any sliding 1 s window); with a rate, both as a ratio of the cap;
- duplicates (delivery ids the sink accepted more than once, deliveries with more than one
  acceptance recorded on its row), losses (rows not terminal, ``sent`` rows never accepted,
  ``failed``/``cancelled``/``skipped`` rows, recipients never fanned out, acceptances naming no
  row or another recipient) and unknowns (no fault is injected here, so none is expected): all
  must be 0.

``--both`` runs the whole bench twice, each in a process and a private stack of its own: first
without a cap, then with ``--rate`` (default 300 then), and prints both reports together.
``--set NAME=VALUE`` (repeatable) gives the roles a setting of their own. The header gives the
date, the machine (CPUs, model, load) and the commit, for bench/RESULTS.md.

Exit status 1 when duplicates, losses or unknowns are not 0 or the run did not settle in time,
2 when the run could not be carried out (e.g. ``Broadcast.urgent`` missing), 130 when
interrupted (everything is torn down first). Role log tails are printed when something is
wrong; ``--keep`` keeps the temp dir (logs, the sink's record; the cluster is deleted).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.soak import (  # noqa: E402
    OPEN_STATUSES,
    QUIET_SECONDS,
    REFUSED_STATUSES,
    Acceptance,
    PrivateRedis,
    Roles,
    Sink,
    Snapshot,
    SoakError,
    _interrupt,
    child_env,
    db,
    db_forget,
    django_setup,
    migrate,
    recorded_duplicates_sql,
    roles_env,
    run_header,
    school_create,
    uninterruptible,
    wait_for,
)
from edsmart.devstack.postgres import PrivatePostgres  # noqa: E402

DATABASE = "edsmart_peak"
BIG_SIZES = (50_000, 40_000, 30_000, 25_000, 20_000, 10_000, 8_000, 7_000, 5_000, 5_000)
SMALL_SCHOOLS = 19
SMALL_FAMILIES = (30, 300)
URGENT_FAMILIES = 1_000
SMALL_DUE_AFTER = 5.0  # seconds after T0 ...
SMALL_DUE_AT_SHARE = 0.30  # ... or once this share of the big school's emails is sent
URGENT_DUE_AFTER = 10.0
URGENT_DUE_AT_SHARE = 0.60
URGENT_SLACK = 5.0  # the urgent bound: its recipients / rate + this
BOTH_DEFAULT_RATE = 300.0
UNCAPPED_TIMEOUT_RATE = 50.0  # emails/s assumed for the default --timeout without a cap
TIMEOUT_MARGIN = 180.0
PROGRESS_EVERY = 10.0
LATER = dt.timedelta(days=1)  # everything is scheduled for then until it falls due


class PeakError(SoakError):
    """The bench could not be carried out (as opposed to the pipeline failing it)."""


def say(t0: float | None, text: str) -> None:
    stamp = f"+{time.time() - t0:7.1f}s " if t0 else ""
    print(f"peak | {stamp}{text}", flush=True)


# --- options ---------------------------------------------------------------------------------


@dataclass
class Options:
    rate: float
    scale: float
    seed: int
    both: bool
    timeout: float | None
    overrides: dict[str, str]
    keep: bool
    report_to: Path | None  # --both: a child writes its report here instead of stdout


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    p.add_argument("--rate", type=float, default=None, help="EDSMART_SEND_RATE, emails/s; 0 = off")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the big school's sizes")
    p.add_argument("--seed", type=int, default=1, help="seeds the small schools' sizes")
    p.add_argument("--both", action="store_true", help="run without a cap, then with --rate")
    p.add_argument("--timeout", type=float, default=None, help="max seconds to reach terminal")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="role env")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, record)")
    p.add_argument("--report-to", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    rate = a.rate if a.rate is not None else (BOTH_DEFAULT_RATE if a.both else 0.0)
    if rate < 0 or not math.isfinite(rate):
        p.error("--rate takes emails per second, 0 or more")
    if a.both and rate == 0:
        p.error("--both needs a cap for its second run: --rate R with R > 0")
    if not 0 < a.scale <= 10:
        p.error("--scale takes a factor above 0 (and at most 10)")
    if a.timeout is not None and a.timeout <= 0:
        p.error("--timeout takes seconds above 0")
    bad = [item for item in a.set if "=" not in item]
    if bad:
        p.error(f"--set takes NAME=VALUE, not {bad[0]!r}")
    overrides = dict(item.split("=", 1) for item in a.set)
    if "EDSMART_SEND_RATE" in overrides:
        p.error("set the rate with --rate, not --set EDSMART_SEND_RATE")
    return Options(rate, a.scale, a.seed, a.both, a.timeout, overrides, a.keep, a.report_to)


# --- the plan and the seed -------------------------------------------------------------------


@dataclass
class Message:
    group: str  # big | small | urgent
    label: str
    model: str  # slip | broadcast
    pk: int
    school_id: int
    expected: int  # recipients (one address per family)


@dataclass
class Plan:
    big_school_id: int
    big: list[Message]
    small: list[Message]
    urgent: Message

    @property
    def messages(self) -> list[Message]:
        return [*self.big, *self.small, self.urgent]

    @property
    def expected(self) -> int:
        return sum(m.expected for m in self.messages)

    @property
    def big_expected(self) -> int:
        return sum(m.expected for m in self.big)


def plan_sizes(scale: float, seed: int) -> tuple[list[int], list[int]]:
    """The big school's ten broadcast sizes (scaled) and the small schools' family counts."""
    rng = random.Random(seed)
    big = [max(1, round(n * scale)) for n in BIG_SIZES]
    small = [rng.randint(*SMALL_FAMILIES) for _ in range(SMALL_SCHOOLS)]
    return big, small


def default_timeout(opts: Options) -> float:
    big, small = plan_sizes(opts.scale, opts.seed)
    emails = sum(big) + sum(small) + URGENT_FAMILIES
    return 1.3 * emails / (opts.rate or UNCAPPED_TIMEOUT_RATE) + TIMEOUT_MARGIN


def urgent_field_check() -> None:
    """The bench measures urgent broadcasts: without the field there is nothing to measure."""
    from django.core.exceptions import FieldDoesNotExist

    from slips.models import Broadcast

    try:
        Broadcast._meta.get_field("urgent")
    except FieldDoesNotExist:
        raise PeakError(
            "slips.models.Broadcast has no 'urgent' field: this tree predates the peak-hour "
            "pipeline (urgent broadcasts, fair share, EDSMART_SEND_RATE)"
        ) from None


def audience_create(school_id: int, name: str, student_ids: list[int] | None) -> int:
    """The whole school (``student_ids`` None), or exactly these students."""
    from django.db import connection

    from slips.models import Audience

    audience = Audience.objects.create(
        school_id=school_id, name=name, whole_school=student_ids is None
    )
    if student_ids is not None:
        through = Audience.students.through._meta.db_table
        with connection.cursor() as cur:
            cur.execute(
                f"INSERT INTO {through} (audience_id, student_id) SELECT %s, unnest(%s::bigint[])",
                [audience.pk, student_ids],
            )
    with connection.cursor() as cur:
        # As autovacuum would after a bulk load: scheduling counts the audience's recipients,
        # and with no statistics for tens of thousands of new rows PostgreSQL picks a plan
        # that takes minutes.
        cur.execute(
            "ANALYZE slips_student, slips_guardian, slips_guardian_students, "
            f"{Audience.students.through._meta.db_table}"
        )
    return audience.pk


def message_create(model: str, school_id: int, audience_id: int, title: str) -> int:
    """A slip or broadcast, drafted and scheduled (the service's way) for tomorrow."""
    from django.db import transaction
    from django.utils import timezone

    from slips.models import Broadcast, SendStatus, Slip
    from slips.services import message_schedule

    send_at = timezone.now() + LATER
    body = f"Dear families,\n\n{title}. Please read it.\n"
    with transaction.atomic():
        if model == "slip":
            message: Slip | Broadcast = Slip.objects.create(
                school_id=school_id,
                title=title,
                body=body,
                audience_id=audience_id,
                due_at=send_at + dt.timedelta(days=7),
                status=SendStatus.DRAFT,
            )
        else:
            message = Broadcast.objects.create(
                school_id=school_id,
                title=title,
                body=body,
                audience_id=audience_id,
                status=SendStatus.DRAFT,
            )
        message_schedule(message=message, send_at=send_at)
    return message.pk


def seed(opts: Options) -> Plan:
    from django.db import connection

    from slips.models import Broadcast

    rng = random.Random(opts.seed)
    big_sizes, small_sizes = plan_sizes(opts.scale, opts.seed)
    largest = max(big_sizes)
    big_id, big_students = school_create("big", "Big School", largest, last_name="Peak")
    big: list[Message] = []
    for i, n in enumerate(big_sizes):
        whole = n == largest and not any(m.expected == largest for m in big)
        students = None if whole else sorted(rng.sample(big_students, n))
        audience = audience_create(big_id, f"Broadcast {i + 1} audience", students)
        title = f"Big school news {i + 1} of {len(big_sizes)}"
        pk = message_create("broadcast", big_id, audience, title)
        big.append(Message("big", f"big #{i + 1}", "broadcast", pk, big_id, n))

    small: list[Message] = []
    for i, n in enumerate(small_sizes):
        slug = f"small-{i + 1:02d}"
        school_id, _ = school_create(slug, f"Small School {i + 1}", n, last_name="Peak")
        audience = audience_create(school_id, "Everyone", None)
        pk = message_create("slip", school_id, audience, f"Excursion of {slug}")
        small.append(Message("small", slug, "slip", pk, school_id, n))

    urgent_school, _ = school_create("urgent", "Urgent School", URGENT_FAMILIES, last_name="Peak")
    audience = audience_create(urgent_school, "Everyone", None)
    pk = message_create("broadcast", urgent_school, audience, "School closed today")
    Broadcast.objects.filter(pk=pk).update(urgent=True)
    urgent = Message("urgent", "urgent", "broadcast", pk, urgent_school, URGENT_FAMILIES)

    with connection.cursor() as cur:
        cur.execute("ANALYZE")  # as autovacuum would have on a live database
    return Plan(big_id, big, small, urgent)


def make_due(messages: list[Message]) -> float:
    """Their send time becomes now (one UPDATE per kind); returns it as Unix seconds."""
    from django.utils import timezone

    from slips.models import Broadcast, SendStatus, Slip

    now = timezone.now()
    for model, kind in ((Slip, "slip"), (Broadcast, "broadcast")):
        pks = [m.pk for m in messages if m.model == kind]
        if pks:
            model.objects.filter(pk__in=pks, status=SendStatus.SCHEDULED).update(
                send_at=now, updated_at=now
            )
    return now.timestamp()


# --- watching the run ------------------------------------------------------------------------


def snapshot() -> Snapshot:
    from django.db import connection

    from notifications.models import Delivery, Mailing
    from slips.models import Broadcast, Slip

    d, m = Delivery._meta.db_table, Mailing._meta.db_table
    b, s = Broadcast._meta.db_table, Slip._meta.db_table
    with connection.cursor() as cur:
        cur.execute(
            f"SELECT count(*), count(*) FILTER (WHERE status = ANY(%s)) FROM {d}",  # noqa: S608
            [list(OPEN_STATUSES)],
        )
        rows, open_rows = cur.fetchone()
        cur.execute(
            f"SELECT (SELECT count(*) FROM {b} WHERE status = 'scheduled') "  # noqa: S608
            f"+ (SELECT count(*) FROM {s} WHERE status = 'scheduled')"
        )
        (undispatched,) = cur.fetchone()
        cur.execute(f"SELECT count(*) FROM {m} WHERE status <> 'completed'")  # noqa: S608
        (open_mailings,) = cur.fetchone()
    return Snapshot(rows, open_rows, undispatched, open_mailings)


def sent_count(school_id: int) -> int:
    from django.db import connection

    from notifications.models import Delivery

    with connection.cursor() as cur:
        cur.execute(
            f"SELECT count(*) FROM {Delivery._meta.db_table} "  # noqa: S608
            "WHERE school_id = %s AND status = 'sent'",
            [school_id],
        )
        return int(cur.fetchone()[0])


@dataclass
class Run:
    """What happened, for the report."""

    t0: float = 0.0
    small_due: float = 0.0
    urgent_due: float = 0.0
    small_why: str = ""
    urgent_why: str = ""
    bulk_share_at_urgent: float = 0.0
    settled: bool = False
    restarts: list[str] = field(default_factory=list)


def supervise(roles: Roles, run_: Run) -> None:
    """A role that exited on its own is started again, as a supervisor would, and noted
    (nothing here kills one, so the report names it)."""
    for name, role in list(roles.current.items()):
        if not role.alive():
            run_.restarts.append(f"{role.name} (exit {role.popen.returncode})")
            say(run_.t0, f"!! {role.log_path.name} exited on its own; restarting\n{role.tail(15)}")
            (roles.worker if name.startswith("w") else roles.beat)(name)


def beat_ticking(role_log: Path) -> bool:
    """Beat has sent its first ``dispatch_due``: from now on a due message is seen within
    ``EDSMART_DISPATCH_INTERVAL_SECONDS``."""
    lines = role_log.read_text(errors="replace").splitlines()
    return any("Sending due task" in x and "tasks.dispatch_due" in x for x in lines)


def run(opts: Options, workdir: Path, stack: contextlib.ExitStack) -> tuple[list[str], int]:
    started = time.monotonic()
    rate_text = f"{opts.rate:g}/s" if opts.rate else "off"
    timeout = opts.timeout or default_timeout(opts)
    say(None, f"rate cap {rate_text}, scale {opts.scale:g}, seed {opts.seed}; workdir {workdir}")

    pg = PrivatePostgres(prefix="edsmart-peak-pg-")
    stack.callback(pg.cleanup)
    pg.start()
    pg.create_database(DATABASE)
    redis = PrivateRedis(workdir)
    stack.callback(redis.stop)
    redis.start()
    sink = Sink(workdir)
    stack.callback(sink.stop)
    overrides = {**opts.overrides, "EDSMART_SEND_RATE": f"{opts.rate:g}"}
    env = roles_env(pg.url(DATABASE), redis.url, sink.port, overrides)
    say(None, f"private PostgreSQL on port {pg.port}, Redis on {redis.port}, sink on {sink.port}")

    migrate(env)
    django_setup({**env, "LOG_LEVEL": "WARNING"})  # this process's own logs: quiet
    stack.callback(db_forget)
    urgent_field_check()
    plan = seed(opts)
    say(
        None,
        f"seeded in {time.monotonic() - started:.0f} s: big school {len(plan.big)} broadcasts "
        f"({plan.big_expected} recipients), {len(plan.small)} small slips "
        f"({sum(m.expected for m in plan.small)}), urgent broadcast ({plan.urgent.expected})",
    )

    roles = Roles(workdir, child_env(env))
    stack.callback(roles.stop_all)
    workers = [roles.worker("w1"), roles.worker("w2")]
    beat = roles.beat("beat1")
    for w in workers:
        roles.wait_ready(w)
    wait_for(lambda: beat_ticking(beat.log_path), timeout=60, what="beat dispatching", interval=0.2)
    say(None, f"2 workers x2 and 1 beat up after {time.monotonic() - started:.0f} s of set-up")

    run_ = Run()
    run_.t0 = t0 = make_due(plan.big)
    say(t0, f"T0: the big school's {len(plan.big)} broadcasts are due")
    say(t0, f"waiting at most {timeout:.0f} s for every delivery to be terminal")

    deadline = time.monotonic() + timeout
    next_progress = time.time() + PROGRESS_EVERY
    quiet_from: tuple[int, float] = (-1, 0.0)
    while time.monotonic() < deadline:
        supervise(roles, run_)
        now = time.time()
        if not run_.urgent_due:
            share = (db(lambda: sent_count(plan.big_school_id)) or 0) / plan.big_expected
            if not run_.small_due and (now >= t0 + SMALL_DUE_AFTER or share >= SMALL_DUE_AT_SHARE):
                run_.small_due = make_due(plan.small)
                run_.small_why = (
                    "on time"
                    if now >= t0 + SMALL_DUE_AFTER
                    else f"brought forward: {share:.0%} of the bulk sent"
                )
                say(t0, f"the {len(plan.small)} small slips are due ({run_.small_why})")
            elif run_.small_due and (now >= t0 + URGENT_DUE_AFTER or share >= URGENT_DUE_AT_SHARE):
                run_.urgent_due = make_due([plan.urgent])
                run_.bulk_share_at_urgent = share
                run_.urgent_why = (
                    "on time"
                    if now >= t0 + URGENT_DUE_AFTER
                    else f"brought forward: {share:.0%} of the bulk sent"
                )
                say(
                    t0,
                    f"the urgent broadcast is due ({run_.urgent_why}); "
                    f"{share:.0%} of the bulk sent",
                )
                if share >= 1:
                    say(
                        t0,
                        "!! WARNING: the bulk was already done when the urgent broadcast fell "
                        "due; its figure measures an idle pipeline (use a larger --scale)",
                    )
            time.sleep(0.2)
            continue
        snap = db(snapshot)
        if time.time() >= next_progress and snap is not None:
            next_progress += PROGRESS_EVERY
            say(
                t0,
                f"accepted {sink.count()}, rows {snap.rows} of {plan.expected}, "
                f"open {snap.open_rows}, not dispatched {snap.undispatched}, "
                f"mailings open {snap.open_mailings}",
            )
        if snap and snap.rows and not (snap.open_rows or snap.undispatched or snap.open_mailings):
            count = sink.count()
            if count != quiet_from[0]:
                quiet_from = (count, time.monotonic())
            elif time.monotonic() - quiet_from[1] >= QUIET_SECONDS:
                run_.settled = True
                break
        else:
            quiet_from = (-1, 0.0)
        time.sleep(0.5)
    say(
        t0,
        "every delivery terminal, every mailing completed, the sink quiet"
        if run_.settled
        else f"!! NOT settled within {timeout:.0f} s (--timeout)",
    )

    roles.stop_all()
    sink_total = sink.stop()
    lines, failed = report(opts, plan, run_, sink.read(), sink_total)
    if failed or run_.restarts:
        lines += ["", "--- role log tails ---", roles.tails()]
    lines.append(f"wall time: {time.monotonic() - started:.0f} s (set-up and settling included)")
    return lines, 1 if failed else 0


# --- the report ------------------------------------------------------------------------------


def pct(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


def busiest_window(times: list[float], width: float = 1.0) -> tuple[int, float]:
    """The most acceptances in any ``width``-second window, and where it starts."""
    best, at, j = 0, times[0] if times else 0.0, 0
    for i, t in enumerate(times):
        while t - times[j] >= width:
            j += 1
        if i - j + 1 > best:
            best, at = i - j + 1, times[j]
    return best, at


@dataclass
class Figures:
    """One message's (or group's) latencies, seconds after its due time."""

    accepted: int
    first: float | None = None
    p50: float | None = None
    p99: float | None = None
    last: float | None = None

    @classmethod
    def of(cls, latencies: list[float]) -> Figures:
        if not latencies:
            return cls(0)
        xs = sorted(latencies)
        return cls(len(xs), xs[0], pct(xs, 50), pct(xs, 99), xs[-1])


def fmt(x: float | None, width: int = 7) -> str:
    return f"{x:{width}.1f}" if x is not None else f"{'-':>{width}}"


TABLE_HEAD = (
    f"    {'message':<12} {'recipients':>10} {'due T0+':>7} {'dispatch':>8} "
    f"{'first':>7} {'p50':>7} {'p99':>7} {'max':>7}"
)


def table_line(label: str, expected: int, due: float, dispatch: float | None, f: Figures) -> str:
    count = f"{expected}" if f.accepted == expected else f"{f.accepted}/{expected}"
    return (
        f"    {label:<12} {count:>10} {due:7.1f} {fmt(dispatch, 8)} "
        f"{fmt(f.first)} {fmt(f.p50)} {fmt(f.p99)} {fmt(f.last)}"
    )


def report(
    opts: Options, plan: Plan, run_: Run, accepted: list[Acceptance], sink_total: int | None
) -> tuple[list[str], bool]:
    """The figures as lines; True when duplicates, losses or unknowns are not zero or the run
    did not settle."""
    from django.db import connection

    from notifications.models import Delivery, Mailing
    from slips.models import Broadcast, Slip

    def q(sql: str, params: list[object] | None = None) -> list[tuple]:
        with connection.cursor() as cur:
            cur.execute(sql, params or [])
            return cur.fetchall()

    db_forget()
    d, m = Delivery._meta.db_table, Mailing._meta.db_table
    rows = {
        pk: (mailing_id, status, email)
        for pk, mailing_id, status, email in q(
            f"SELECT id, mailing_id, status, email_normalized FROM {d}"  # noqa: S608
        )
    }
    statuses = Counter(status for _, status, _ in rows.values())
    db_dupes = q(recorded_duplicates_sql())
    has_urgent = any(f.name == "urgent" for f in Mailing._meta.get_fields())
    mailing_of: dict[tuple[str, int], int] = {}
    mailing_urgent: dict[int, bool] = {}
    for pk, slip_id, broadcast_id, urgent in q(
        f"SELECT id, slip_id, broadcast_id, {'urgent' if has_urgent else 'false'} "  # noqa: S608
        f"FROM {m} WHERE round = 0"
    ):
        mailing_of["slip" if slip_id else "broadcast", slip_id or broadcast_id] = pk
        mailing_urgent[pk] = bool(urgent)
    timing: dict[tuple[str, int], tuple[float, float | None]] = {}
    for model, kind in ((Slip, "slip"), (Broadcast, "broadcast")):
        for pk, send_at, dispatched_at in model.objects.values_list(
            "pk", "send_at", "dispatched_at"
        ):
            timing[kind, pk] = (
                send_at.timestamp(),
                dispatched_at.timestamp() if dispatched_at else None,
            )

    ours = [a for a in accepted if a.delivery_id is not None]
    others = len(accepted) - len(ours)
    per_delivery = Counter(a.delivery_id for a in ours)
    dupes = {pk: n for pk, n in per_delivery.items() if n > 1}
    strays = sorted(pk for pk in per_delivery if pk not in rows)
    wrong_rcpt = [
        a for a in ours if a.delivery_id in rows and a.rcpt.lower() != rows[a.delivery_id][2]
    ]
    times_by_mailing: dict[int, list[float]] = defaultdict(list)
    for a in ours:
        if a.delivery_id in rows:
            times_by_mailing[rows[a.delivery_id][0]].append(a.at)
    rows_by_mailing = Counter(mailing_id for mailing_id, _, _ in rows.values())

    not_terminal = {pk: s for pk, (_, s, _) in rows.items() if s in OPEN_STATUSES}
    sent_unaccepted = [
        pk for pk, (_, s, _) in rows.items() if s == "sent" and pk not in per_delivery
    ]
    refused = [pk for pk, (_, s, _) in rows.items() if s in REFUSED_STATUSES]
    unknown = [pk for pk, (_, s, _) in rows.items() if s == "unknown"]
    never_fanned_out = 0
    for msg in plan.messages:
        mailing_id = mailing_of.get((msg.model, msg.pk))
        never_fanned_out += max(0, msg.expected - rows_by_mailing.get(mailing_id or -1, 0))
    duplicates = len(dupes) + len(db_dupes)
    losses = (
        len(not_terminal)
        + len(sent_unaccepted)
        + len(refused)
        + never_fanned_out
        + len(strays)
        + len(wrong_rcpt)
    )

    t0 = run_.t0
    out: list[str] = []
    cap = opts.rate
    title = f"cap {cap:g} emails/s" if cap else "no cap"
    out.append(f"================ peak report: {title} ================")
    out.append(
        f"scale {opts.scale:g}, seed {opts.seed}: big school {len(plan.big)} broadcasts "
        f"({plan.big_expected} recipients) due at T0; {len(plan.small)} small slips "
        f"({sum(x.expected for x in plan.small)}) due at T0+{run_.small_due - t0:.1f} s "
        f"({run_.small_why}); urgent broadcast ({plan.urgent.expected}, school 'urgent', "
        f"a 21st school) due at T0+{run_.urgent_due - t0:.1f} s ({run_.urgent_why})"
    )
    out.append(
        "seconds after each message's due time: when it was dispatched (fanned out), its first "
        "email, p50 and p99 over its recipients' acceptances at the sink, max = due -> last email"
    )

    def figures(msg: Message) -> tuple[float, float | None, Figures]:
        due, dispatched = timing.get((msg.model, msg.pk), (math.nan, None))
        mailing_id = mailing_of.get((msg.model, msg.pk))
        lat = [t - due for t in times_by_mailing.get(mailing_id or -1, [])]
        return due, (dispatched - due if dispatched else None), Figures.of(lat)

    out.append("  small schools (one slip each):")
    out.append(TABLE_HEAD)
    small_last: list[float] = []
    small_lat: list[float] = []
    for msg in plan.small:
        due, dispatch, f = figures(msg)
        out.append(table_line(msg.label, msg.expected, due - t0, dispatch, f))
        if f.last is not None:
            small_last.append(f.last)
        mailing_id = mailing_of.get((msg.model, msg.pk), -1)
        small_lat += [t - due for t in times_by_mailing.get(mailing_id, [])]
    if small_last:
        xs = sorted(small_last)
        every = Figures.of(small_lat)
        out.append(
            f"    over the {len(plan.small)} slips, due -> last email: p50 {pct(xs, 50):.1f}, "
            f"p99 {pct(xs, 99):.1f}, max {xs[-1]:.1f} s; over their "
            f"{every.accepted} recipients: p50 {fmt(every.p50, 0)}, p99 {fmt(every.p99, 0)} s"
        )
    out.append("  big school:")
    out.append(TABLE_HEAD)
    big_lat: list[float] = []
    for msg in plan.big:
        due, dispatch, f = figures(msg)
        out.append(table_line(msg.label, msg.expected, due - t0, dispatch, f))
        mailing_id = mailing_of.get((msg.model, msg.pk), -1)
        big_lat += [t - due for t in times_by_mailing.get(mailing_id, [])]
    out.append(table_line("all ten", plan.big_expected, 0.0, None, Figures.of(big_lat)))
    out.append("  urgent broadcast:")
    out.append(TABLE_HEAD)
    urgent_due, dispatch, f = figures(plan.urgent)
    out.append(table_line(plan.urgent.label, plan.urgent.expected, urgent_due - t0, dispatch, f))
    urgent_mailing = mailing_of.get(("broadcast", plan.urgent.pk))
    if urgent_mailing is not None and not mailing_urgent.get(urgent_mailing):
        out.append(
            "    !! its mailing is not marked urgent"
            + ("" if has_urgent else " (Mailing has no 'urgent' field)")
        )
    if cap:
        bound = plan.urgent.expected / cap + URGENT_SLACK
        verdict = "met" if f.last is not None and f.last <= bound else "MISSED"
        out.append(
            f"    bound {plan.urgent.expected}/{cap:g} + {URGENT_SLACK:g} = {bound:.1f} s "
            f"(due -> last email): {verdict}"
        )
    big_mailings = {mailing_of.get(("broadcast", x.pk)) for x in plan.big}
    big_after = sum(
        1
        for a in ours
        if a.delivery_id in rows and rows[a.delivery_id][0] in big_mailings and a.at > urgent_due
    )
    out.append(
        f"    the bulk when it fell due: {run_.bulk_share_at_urgent:.0%} sent; "
        f"{big_after} of the big school's emails were accepted after it"
        + ("" if big_after else " !! it did not land during the bulk (use a larger --scale)")
    )

    times = sorted(a.at for a in ours)
    if len(times) >= 2:
        span = times[-1] - times[0]
        achieved = len(times) / span
        busiest, busiest_at = busiest_window(times)
        out.append(
            f"rate: {achieved:.0f} accepted/s ({len(times)} over {span:.1f} s, first at "
            f"T0+{times[0] - t0:.1f} s); busiest 1 s window: {busiest} "
            f"(from T0+{busiest_at - t0:.1f} s)"
            + (
                f"; vs the cap {cap:g}/s: rate {achieved / cap:.2f}, busiest {busiest / cap:.2f}"
                if cap
                else ""
            )
        )
    else:
        out.append("rate: n/a (fewer than two accepted emails)")
    out.append(
        f"deliveries (rows): {len(rows)} of {plan.expected} expected; statuses {dict(statuses)}; "
        f"accepted at the sink: {len(accepted)} ({len(per_delivery)} distinct deliveries, "
        f"{others} without a delivery header; the sink's own count {sink_total})"
    )
    if run_.restarts:
        out.append(f"roles that exited on their own (restarted): {run_.restarts}")
    out.append(
        f"duplicates: {duplicates} (accepted more than once: {len(dupes)}"
        + (f" {sorted(dupes.items())[:20]}" if dupes else "")
        + f"; deliveries the database records as accepted more than once: {len(db_dupes)}"
        + (f" {db_dupes[:20]}" if db_dupes else "")
        + ")"
    )
    out.append(
        f"losses: {losses} (not terminal: {len(not_terminal)}"
        + (f" {dict(Counter(not_terminal.values()))}" if not_terminal else "")
        + f"; sent but never accepted: {len(sent_unaccepted)}"
        + (f" {sent_unaccepted[:20]}" if sent_unaccepted else "")
        + f"; failed/cancelled/skipped: {len(refused)}; never fanned out: {never_fanned_out}"
        + f"; accepted for no row: {len(strays)}; for another recipient: {len(wrong_rcpt)})"
    )
    if refused:
        for status, error, n in q(
            f"SELECT status, last_error, count(*) FROM {d} WHERE status = ANY(%s) "  # noqa: S608
            "GROUP BY 1, 2 ORDER BY 3 DESC LIMIT 10",
            [list(REFUSED_STATUSES)],
        ):
            out.append(f"    {n} x {status}: {error[:300]!r}")
    out.append(f"unknowns: {len(unknown)} (no fault is injected: none expected)")
    for pk, error in q(
        f"SELECT id, last_error FROM {d} WHERE status = 'unknown' ORDER BY id LIMIT 10"  # noqa: S608
    ):
        out.append(f"    {pk}: {error[:200]!r}")
    failed = bool(duplicates or losses or unknown or not run_.settled)
    verdict = "FAIL" if failed else "OK"
    out.append(
        f"{verdict}: duplicates {duplicates}, losses {losses}, unknowns {len(unknown)}"
        + ("" if run_.settled else "; NOT settled in time")
    )
    return out, failed


# --- the header and main ---------------------------------------------------------------------


def run_one(opts: Options) -> int:
    """One run in this process; its report goes to stdout, or to ``--report-to``."""
    workdir = Path(tempfile.mkdtemp(prefix="edsmart-peak-"))
    stack = contextlib.ExitStack()
    code, lines = 2, []
    try:
        lines, code = run(opts, workdir, stack)
    except KeyboardInterrupt:
        print("peak | interrupted; cleaning up", flush=True)
        code = 130
    except Exception as exc:  # noqa: BLE001 - whatever it was, say so and tear down
        if not isinstance(exc, SoakError):
            traceback.print_exc()
        print(f"peak | could not complete: {exc}", flush=True)
        for log in sorted(workdir.glob("*.log")):
            print(f"----- {log.name} -----")
            print("\n".join(log.read_text(errors="replace").splitlines()[-20:]))
    finally:
        with uninterruptible():
            stack.close()  # roles, Django's connection, sink, Redis, PostgreSQL: in reverse
            if opts.keep:
                print(f"peak | kept {workdir}", flush=True)
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    if lines:
        if opts.report_to is not None:
            opts.report_to.write_text("\n".join(lines) + "\n")
        else:
            print("\n" + "\n".join([*run_header("peak.py"), "", *lines]))
    return code


def run_both(opts: Options) -> int:
    """Two runs, each a process with a private stack of its own: no cap, then the cap."""
    reports = Path(tempfile.mkdtemp(prefix="edsmart-peak-reports-"))
    codes: list[int] = []
    sections: list[str] = []
    try:
        for rate in (0.0, opts.rate):
            report_to = reports / f"rate-{rate:g}.txt"
            argv = [
                sys.executable,
                str(Path(__file__).resolve()),
                *("--rate", f"{rate:g}", "--scale", f"{opts.scale:g}", "--seed", str(opts.seed)),
                *(("--timeout", f"{opts.timeout:g}") if opts.timeout else ()),
                *(x for k, v in opts.overrides.items() for x in ("--set", f"{k}={v}")),
                *(("--keep",) if opts.keep else ()),
                *("--report-to", str(report_to)),
            ]
            say(None, f"run {len(codes) + 1} of 2: rate cap {f'{rate:g}/s' if rate else 'off'}")
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
            try:
                codes.append(child.wait())
            except KeyboardInterrupt:
                child.terminate()  # it tears its stack down, then exits
                child.wait()
                raise
            if report_to.exists():
                sections.append(report_to.read_text())
            else:
                sections.append(f"(run {len(codes)}: no report, exit status {codes[-1]})\n")
            if codes[-1] in (2, 130):
                break
    except KeyboardInterrupt:
        print("peak | interrupted", flush=True)
        return 130
    finally:
        shutil.rmtree(reports, ignore_errors=True)
    print("\n" + "\n".join(run_header("peak.py")) + "\n")
    print("\n".join(sections))
    return max(codes) if codes else 2


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    # Also when started in the background, where SIGINT arrives ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    return run_both(opts) if opts.both else run_one(opts)


if __name__ == "__main__":
    sys.exit(main())
