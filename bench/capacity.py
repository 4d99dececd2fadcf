"""What one email costs: PostgreSQL statements, commits, execution time, WAL, Redis, CPU, SMTP.

    .venv/bin/python bench/capacity.py [--recipients 10000] [--rounds 1] [--pgbouncer]
        [--configs direct,direct-unprepared,pgbouncer] [--workers 1] [--idle-seconds 10]
        [--durable] [--track-planning]
        [--json PATH] [--quick] [--keep]

Why: workers and web processes scale out by adding hosts; PostgreSQL is the one place every
email passes through (a committed start and a recorded outcome each), so its cost per email
decides how far one database goes (docs/scaling.md builds the capacity model from these
figures, and bench/peak_model.py predicts the peak bench from them). Nobody can plan with
"it felt fast": this measures.

What runs, all private and on 127.0.0.1 (bench/soak.py's machinery): a throwaway PostgreSQL
cluster with ``pg_stat_statements`` preloaded, a redis-server, and the
SMTP sink (``bench/smtp_sink.py --record``), which counts every byte clients send it. The
roles run as production runs them: ``--workers`` (default 1; bench/peak.py runs 2) ``celery
worker -Q periodic,send --concurrency 2`` (real worker processes, not an in-process loop) and
one ``celery beat`` (dispatch every second), connecting as their own database role
(``edsmart``) so that the bench's own queries are not counted. The database is migrated and
seeded once (one school of ``--recipients`` families, one address each, and a whole-school
broadcast scheduled for tomorrow) as a template; every measured run gets a fresh copy.

One run: the roles start and idle (``--idle-seconds``, measured too: the fixed cost of beat
and an idle worker per second), then the broadcast falls due; the window closes when the sink
has accepted every email and no delivery is open. Across the window it takes differences of:

- statements: ``pg_stat_statements`` calls by the ``edsmart`` role in the run's database
  (transaction control, BEGIN/COMMIT/SAVEPOINT, counted apart), execution time, and planning
  time with ``--track-planning`` (off by default: with four sessions running the same statement
  its bookkeeping cost a fifth of the throughput here);
- commits: ``pg_stat_database.xact_commit`` (every transaction, read-only ones too, minus the
  bench's own polls, counted), and COMMIT records in the WAL (``pg_waldump --stats``: the
  transactions that wrote something);
- WAL bytes: ``pg_current_wal_lsn()`` before and after, and full-page images apart;
- Redis commands: ``INFO commandstats`` before and after (the bench's own ``INFO`` left out);
- CPU seconds (``/proc`` through psutil, each process tree, exited children included): the
  worker (main process and pool), beat, PostgreSQL (postmaster, backends, background
  processes; read after the roles' backends have exited, so their last figures are in),
  redis-server, the sink and PgBouncer when in front;
- bytes sent to the SMTP server: everything clients wrote to the sink (commands, envelopes,
  messages), and the messages alone;
- throughput: recipients / (due -> last outcome recorded, the rows' ``updated_at``).

Per-email figures are the window's totals / recipients (fan-out and dispatch included).

``--pgbouncer`` measures three configurations in each round, one after the other on fresh
copies, and prints their throughput ratios (the figures to compare on a shared machine):
``direct`` (prepared statements, the default), ``direct-unprepared``
(``DB_PREPARED_STATEMENTS=0``) and ``pgbouncer`` (Debian's pgbouncer in transaction pooling,
``DB_TRANSACTION_POOLER=1``). ``--configs`` picks any of them. ``--durable`` turns fsync,
synchronous_commit and full_page_writes back on (the private cluster runs without them, like
every bench here) and checkpoints before each window, so that WAL bytes include the full-page
images the first touch of each page writes after a checkpoint. ``--quick``: 500 recipients
unless told, no idle window, one round. ``--json PATH`` writes every figure for
bench/peak_model.py and tests/test_bench_capacity.py.

Exit status 1 when an email was not accepted exactly once or a row is not ``sent``, 2 when
the run could not be carried out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.peak import audience_create, beat_ticking, message_create  # noqa: E402
from bench.soak import (  # noqa: E402
    OPEN_STATUSES,
    PrivateRedis,
    Roles,
    Sink,
    SoakError,
    child_env,
    db_forget,
    django_setup,
    migrate,
    roles_env,
    run_header,
    run_in_workdir,
    school_create,
    wait_for,
)
from edsmart.devstack.pgbouncer import PrivatePgBouncer  # noqa: E402
from edsmart.devstack.postgres import PrivatePostgres  # noqa: E402

APP_ROLE = "edsmart"  # the roles' database user; the bench queries as postgres
TEMPLATE = "capacity_template"
CONFIGS = {
    "direct": "direct, prepared statements (the default)",
    "direct-unprepared": "direct, DB_PREPARED_STATEMENTS=0",
    "pgbouncer": "PgBouncer (transaction pooling), DB_TRANSACTION_POOLER=1",
}
TXN_CONTROL = re.compile(r"^\s*(BEGIN|COMMIT|ROLLBACK|SAVEPOINT|RELEASE|START)\b", re.I)
# The foreign-key triggers' own lookups (run inside an INSERT or UPDATE, not sent by a client).
FK_CHECK = re.compile(r'^SELECT \S+ FROM ONLY "[^"]+"\."[^"]+" x WHERE .* FOR KEY SHARE OF x')
WALDUMP_LINE = re.compile(
    r"^(?P<kind>\S+)\s+(?P<n>\d+)\s+\(\s*[\d.]+\)\s+(?P<rec>\d+)\s+\(\s*[\d.]+\)\s+"
    r"(?P<fpi>\d+)\s+\(\s*[\d.]+\)\s+(?P<all>\d+)"
)
QUICK_RECIPIENTS = 500


def say(text: str) -> None:
    print(f"capacity | {text}", flush=True)


# --- measuring -------------------------------------------------------------------------------


def tree_cpu(*pids: int | None) -> float:
    """CPU seconds of processes and their descendants, exited (reaped) children included."""
    procs: list[psutil.Process] = []
    for pid in pids:
        if pid is None:
            continue
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(pid)
            procs += [root, *root.children(recursive=True)]
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def postmaster_pid(pg: PrivatePostgres) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int((pg.data / "postmaster.pid").read_text().split()[0])
    return None


@dataclass
class Snapshot:
    """Cumulative counters at one moment; a window is the difference of two."""

    at: float
    wal_lsn: str
    # queryid -> query, calls, exec ms, plan ms, shared buffers hit or read
    statements: dict[str, tuple[str, int, float, float, int]]
    xact_commit: int
    redis_calls: dict[str, int]
    redis_cpu: float
    cpu: dict[str, float]


class Bench:
    """The private services, and the counters read from them."""

    def __init__(
        self, workdir: Path, stack: contextlib.ExitStack, durable: bool, track_planning: bool
    ) -> None:
        self.workdir = workdir
        self.durable = durable
        settings = {
            "shared_preload_libraries": "pg_stat_statements",
            "pg_stat_statements.track_planning": "on" if track_planning else "off",
            "max_wal_size": "8GB",  # no checkpoint recycles the window's WAL before it is read
            "checkpoint_timeout": "1h",
        }
        if durable:
            settings |= {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
        self.pg = PrivatePostgres(prefix="edsmart-capacity-pg-", settings=settings)
        stack.callback(self.pg.cleanup)
        self.pg.start()
        self.admin_url = self.pg.url("postgres")
        self.sql(f"CREATE ROLE {APP_ROLE} LOGIN SUPERUSER")
        self.sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        self.redis = PrivateRedis(workdir)
        stack.callback(self.redis.stop)
        self.redis.start()
        self.own_transactions = 0  # the bench's own, in a run's database

    def url(self, database: str) -> str:
        return self.pg.url(database).replace("postgres@", f"{APP_ROLE}@", 1)

    def sql(self, statement: str, params: tuple = (), *, database: str = "postgres") -> list:
        import psycopg

        url = self.admin_url if database == "postgres" else self.pg.url(database)
        with psycopg.connect(url, autocommit=True) as conn:
            cur = conn.execute(statement, params)
            if database != "postgres":
                self.own_transactions += 1
            return cur.fetchall() if cur.description else []

    def snapshot(self, database: str, pids: dict[str, list[int | None]]) -> Snapshot:
        import psycopg
        import redis

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            lsn = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]
            rows = conn.execute(
                "SELECT s.queryid::text, s.query, s.calls, s.total_exec_time, s.total_plan_time, "
                "s.shared_blks_hit + s.shared_blks_read "
                "FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid "
                "JOIN pg_database d ON d.oid = s.dbid WHERE r.rolname = %s AND d.datname = %s",
                (APP_ROLE, database),
            ).fetchall()
            found = conn.execute(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (database,)
            ).fetchone()
        client = redis.Redis.from_url(self.redis.url)
        try:
            stats = client.info("commandstats")
            cpu = client.info("cpu")
        finally:
            client.close()
        calls = {
            k.removeprefix("cmdstat_"): int(v["calls"])
            for k, v in stats.items()
            if k != "cmdstat_info"
        }
        cpu_by_role = {name: tree_cpu(*ids) for name, ids in pids.items()}
        cpu_by_role["postgres"] = tree_cpu(postmaster_pid(self.pg))
        return Snapshot(
            at=time.time(),
            wal_lsn=lsn,
            statements={r[0]: (r[1], int(r[2]), float(r[3]), float(r[4]), int(r[5])) for r in rows},
            xact_commit=int(found[0]) if found else 0,
            redis_calls=calls,
            redis_cpu=float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
            cpu=cpu_by_role,
        )

    def wal_bytes(self, start: str, end: str) -> int:
        return int(self.sql("SELECT pg_wal_lsn_diff(%s, %s)", (end, start))[0][0])

    def wal_records(self, start: str, end: str) -> dict[str, dict[str, int]]:
        """``pg_waldump --stats=record`` between two LSNs: per record kind, its count, record
        bytes and full-page-image bytes."""
        self.sql("SELECT pg_switch_wal()")  # every byte up to ``end`` is in a file now
        result = subprocess.run(
            [
                str(self.pg.bin_dir / "pg_waldump"),
                *("--stats=record", "-p", str(self.pg.data / "pg_wal"), "-s", start, "-e", end),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        kinds: dict[str, dict[str, int]] = {}
        for line in result.stdout.splitlines():
            found = WALDUMP_LINE.match(line)
            if found and found["kind"] != "Total":
                kinds[found["kind"]] = {
                    "n": int(found["n"]),
                    "record_bytes": int(found["rec"]),
                    "fpi_bytes": int(found["fpi"]),
                }
        if not kinds:
            raise SoakError(f"pg_waldump gave nothing:\n{result.stderr[-2000:]}")
        return kinds


class CountingSink(Sink):
    """The recording sink, keeping its closing lines: messages, bytes, received, accepted."""

    def stop_counts(self) -> dict[str, int]:
        if self.popen.poll() is None:
            self.popen.terminate()
        out, _ = self.popen.communicate(timeout=10)
        self._stopped = True
        words = out.split()
        return {
            name: int(words[words.index(name) + 1])
            for name in ("messages", "bytes", "received", "accepted")
        }


# --- the template and one run ----------------------------------------------------------------


def build_template(bench: Bench, recipients: int) -> int:
    """Migrated and seeded once; returns the broadcast's id. Every run copies it."""
    bench.sql(f"CREATE DATABASE {TEMPLATE} OWNER {APP_ROLE}")
    env = roles_env(bench.url(TEMPLATE), bench.redis.url, 1, {})
    migrate(env)
    django_setup({**env, "LOG_LEVEL": "WARNING"})
    school_id, _ = school_create("capacity", "Capacity School", recipients, last_name="Cap")
    audience = audience_create(school_id, "Everyone", None)
    broadcast = message_create("broadcast", school_id, audience, "Excursion to the zoo")
    db_forget()  # a template must have no session
    return broadcast


@dataclass
class Window:
    """One measured stretch of one run, as totals."""

    seconds: float
    statements: int
    txn_control: int
    fk_checks: int
    exec_ms: float
    plan_ms: float
    commits: int
    wal_bytes: int
    redis_commands: int
    cpu_s: dict[str, float]
    top: list[dict] = field(default_factory=list)
    redis_top: dict[str, int] = field(default_factory=dict)


def window(bench: Bench, before: Snapshot, after: Snapshot, own: int) -> Window:
    """The differences of two snapshots; ``own`` is the bench's own transactions between
    them, which are not the pipeline's."""
    calls = exec_ms = plan_ms = 0.0
    control = fk_checks = 0
    top = []
    for qid, (query, n, ex, pl, blks) in after.statements.items():
        _, n0, ex0, pl0, blks0 = before.statements.get(qid, (query, 0, 0.0, 0.0, 0))
        dn = n - n0
        if dn <= 0:
            continue
        if TXN_CONTROL.match(query):
            control += dn
        elif FK_CHECK.match(query):
            fk_checks += dn
        else:
            calls += dn
        exec_ms += ex - ex0
        plan_ms += pl - pl0
        top.append(
            {
                "query": " ".join(query.split())[:200],
                "calls": dn,
                "exec_ms": ex - ex0,
                "buffers": blks - blks0,
            }
        )
    top.sort(key=lambda s: -s["exec_ms"])
    redis_calls = {
        k: v - before.redis_calls.get(k, 0)
        for k, v in after.redis_calls.items()
        if v - before.redis_calls.get(k, 0) > 0
    }
    cpu = {k: after.cpu[k] - before.cpu.get(k, 0.0) for k in after.cpu}
    cpu["redis"] = after.redis_cpu - before.redis_cpu
    return Window(
        seconds=after.at - before.at,
        statements=int(calls),
        txn_control=control,
        fk_checks=fk_checks,
        exec_ms=exec_ms,
        plan_ms=plan_ms,
        commits=after.xact_commit - before.xact_commit - own,
        wal_bytes=bench.wal_bytes(before.wal_lsn, after.wal_lsn),
        redis_commands=sum(redis_calls.values()),
        cpu_s=cpu,
        top=top[:12],
        redis_top=dict(sorted(redis_calls.items(), key=lambda kv: -kv[1])),
    )


def run_one(
    bench: Bench, config: str, round_no: int, broadcast_id: int, opts: argparse.Namespace
) -> dict:
    """One configuration on a fresh copy of the template: idle window, then the send."""
    from notifications.models import Delivery
    from slips.models import Broadcast

    n = opts.recipients
    database = f"capacity_{config.replace('-', '_')}_{round_no}"
    bench.sql(f"CREATE DATABASE {database} TEMPLATE {TEMPLATE} OWNER {APP_ROLE}")
    bench.sql("SELECT 1", database=database)  # connect once, so the first poll is not special
    with contextlib.suppress(Exception):
        import redis

        redis.Redis.from_url(bench.redis.url).flushall()
    run_dir = bench.workdir / f"{database}"
    run_dir.mkdir()
    sink = CountingSink(run_dir)
    stack = contextlib.ExitStack()
    try:
        stack.callback(sink.stop)
        url = bench.url(database)
        overrides: dict[str, str] = {}
        bouncer = None
        if config == "pgbouncer":
            bouncer = PrivatePgBouncer(
                upstream_host="127.0.0.1", upstream_port=bench.pg.port or 0, user=APP_ROLE
            )
            stack.callback(bouncer.cleanup)
            bouncer.start()
            url = bouncer.url(database)
            overrides |= {"DB_TRANSACTION_POOLER": "1", "DB_PREPARED_STATEMENTS": "0"}
        elif config == "direct-unprepared":
            overrides["DB_PREPARED_STATEMENTS"] = "0"
        env = roles_env(url, bench.redis.url, sink.port, overrides)
        roles = Roles(run_dir, child_env(env))
        stack.callback(roles.stop_all)
        workers = [roles.worker(f"w{i + 1}") for i in range(opts.workers)]
        beat = roles.beat("beat1")
        for worker in workers:
            roles.wait_ready(worker)
        wait_for(lambda: beat_ticking(beat.log_path), timeout=60, what="beat ticking", interval=0.2)
        pids: dict[str, list[int | None]] = {
            "worker": [w.pid for w in workers],
            "beat": [beat.pid],
            "sink": [sink.popen.pid],
            "pgbouncer": [bouncer.popen.pid if bouncer and bouncer.popen else None],
        }
        if bench.durable:
            bench.sql("CHECKPOINT")
        idle = None
        if opts.idle_seconds > 0 and round_no == 1:  # a fixed cost: once is enough
            start = bench.snapshot(database, pids)
            own = bench.own_transactions
            time.sleep(opts.idle_seconds)
            idle = window(
                bench, start, bench.snapshot(database, pids), bench.own_transactions - own
            )

        before = bench.snapshot(database, pids)
        own_before = bench.own_transactions
        bouncer_before = bouncer.totals().get("total_xact_count", 0) if bouncer else 0
        d_table, b_table = Delivery._meta.db_table, Broadcast._meta.db_table
        due = bench.sql(
            f"UPDATE {b_table} SET send_at = now(), updated_at = now() "  # noqa: S608
            "WHERE id = %s AND status = 'scheduled' RETURNING extract(epoch FROM send_at)",
            (broadcast_id,),
            database=database,
        )[0][0]
        wait_for(
            lambda: sink.count() >= n,
            timeout=120 + n / 50,
            what=f"{n} emails at the sink",
            interval=0.05,
        )
        wait_for(
            lambda: (
                not bench.sql(
                    f"SELECT 1 FROM {d_table} WHERE status = ANY(%s) LIMIT 1",  # noqa: S608
                    (list(OPEN_STATUSES),),
                    database=database,
                )
            ),
            timeout=60,
            what="every delivery recorded",
            interval=0.1,
        )
        # CPU of the processes first (they are about to stop); then the roles stop, their
        # backends exit and flush their statistics, and the database's figures are read.
        worker_cpu = {k: tree_cpu(*v) for k, v in pids.items()}
        # What PgBouncer carried in the window: proof the roles went through it (its CPU is
        # too small to show in /proc's 10 ms ticks on a short run).
        bouncer_xacts = (
            bouncer.totals().get("total_xact_count", 0) - bouncer_before if bouncer else None
        )
        roles.stop_all()
        if bouncer is not None:
            bouncer.stop()
        wait_for(
            lambda: not bench.sql("SELECT 1 FROM pg_stat_activity WHERE usename = %s", (APP_ROLE,)),
            timeout=30,
            what="the roles' sessions to end",
            interval=0.1,
        )
        after = bench.snapshot(database, {})
        after.cpu |= worker_cpu
        recorded = bench.sql(
            f"SELECT extract(epoch FROM max(updated_at)), count(*) FILTER "  # noqa: S608
            f"(WHERE status = 'sent'), count(*), count(*) FILTER (WHERE accepted > 1) "
            f"FROM {d_table}",
            database=database,
        )[0]
        dispatched = bench.sql(
            f"SELECT extract(epoch FROM dispatched_at) FROM {b_table} WHERE id = %s",  # noqa: S608
            (broadcast_id,),
            database=database,
        )[0][0]
        own = bench.own_transactions - own_before
        totals = window(bench, before, after, own)
        wal = bench.wal_records(before.wal_lsn, after.wal_lsn)
        counts = sink.stop_counts()
        accepted = sink.read()
    finally:
        stack.close()
    last_recorded, (sent, rows, duplicates) = float(recorded[0]), recorded[1:4]
    delivery_ids = [a.delivery_id for a in accepted]
    exactly_once = (
        len(delivery_ids) == len(set(delivery_ids)) == n == sent == rows and duplicates == 0
    )
    first = min(a.at for a in accepted) - float(due)
    elapsed = last_recorded - float(due)
    commit_records = wal.get("Transaction/COMMIT", {}).get("n", 0)
    fpi = sum(k["fpi_bytes"] for k in wal.values())
    by_rmgr: dict[str, int] = {}
    for kind, k in wal.items():
        rmgr = kind.split("/", 1)[0]
        by_rmgr[rmgr] = by_rmgr.get(rmgr, 0) + k["record_bytes"] + k["fpi_bytes"]
    cpu_total = sum(totals.cpu_s.values())
    result = {
        "config": config,
        "round": round_no,
        "recipients": n,
        "exactly_once": exactly_once,
        "dispatched_s": round(float(dispatched) - float(due), 3),
        "first_acceptance_s": round(first, 3),
        "elapsed_s": round(elapsed, 3),
        "window_s": round(totals.seconds, 3),
        "emails_per_s": round(n / elapsed, 1),
        "pgbouncer_transactions": bouncer_xacts,
        # Over due -> last recorded: the window also holds the roles' shutdown, which is idle.
        "cpu_utilisation": round(cpu_total / (elapsed * (os.cpu_count() or 1)), 3),
        "totals": {
            "statements": totals.statements,
            "transaction_control": totals.txn_control,
            "fk_checks": totals.fk_checks,
            "exec_ms": round(totals.exec_ms, 1),
            "plan_ms": round(totals.plan_ms, 1),
            "commits": totals.commits,
            "commit_records": commit_records,
            "wal_bytes": totals.wal_bytes,
            "wal_fpi_bytes": fpi,
            "redis_commands": totals.redis_commands,
            "cpu_s": {k: round(v, 3) for k, v in totals.cpu_s.items()},
            "smtp_bytes": counts["received"],
            "message_bytes": counts["bytes"],
            "bench_own_transactions": own,
        },
        "per_email": per_email(totals, n, commit_records, fpi, counts),
        "wal_bytes_by_rmgr": dict(sorted(by_rmgr.items(), key=lambda kv: -kv[1])),
        "top_statements": totals.top,
        "redis_by_command": totals.redis_top,
    }
    if idle is not None:
        result["idle_per_second"] = {
            "statements": round(idle.statements / idle.seconds, 1),
            "commits": round(idle.commits / idle.seconds, 1),
            "wal_bytes": round(idle.wal_bytes / idle.seconds),
            "redis_commands": round(idle.redis_commands / idle.seconds, 1),
            "cpu_ms": {k: round(1000 * v / idle.seconds, 2) for k, v in idle.cpu_s.items()},
        }
    return result


def per_email(
    w: Window, n: int, commit_records: int, fpi: int, counts: dict[str, int]
) -> dict[str, object]:
    """The window's totals over the emails sent: what docs/scaling.md multiplies."""
    return {
        "statements": round(w.statements / n, 3),
        "transaction_control": round(w.txn_control / n, 3),
        "fk_checks": round(w.fk_checks / n, 3),
        "exec_ms": round(w.exec_ms / n, 4),
        "plan_ms": round(w.plan_ms / n, 4),
        "commits": round(w.commits / n, 3),
        "commit_records": round(commit_records / n, 3),
        "wal_bytes": round(w.wal_bytes / n),
        "wal_fpi_bytes": round(fpi / n),
        "redis_commands": round(w.redis_commands / n, 3),
        "cpu_ms": {k: round(1000 * v / n, 4) for k, v in w.cpu_s.items()},
        "cpu_ms_total": round(1000 * sum(w.cpu_s.values()) / n, 4),
        "smtp_bytes": round(counts["received"] / n),
        "message_bytes": round(counts["bytes"] / n),
    }


# --- the report ------------------------------------------------------------------------------


def report_lines(runs: list[dict], configs: list[str]) -> tuple[list[str], dict]:
    """The printed report and the JSON summary. Per configuration, the round with the median
    rate gives the per-email figures; ratios pair each round's configurations (they ran back
    to back) and take the median, since the machine drifts between rounds."""
    out: list[str] = []
    summary: dict[str, dict] = {}
    for config in configs:
        mine = [r for r in runs if r["config"] == config]
        if not mine:
            continue
        rates = [r["emails_per_s"] for r in mine]
        best = sorted(mine, key=lambda r: r["emails_per_s"])[len(mine) // 2]
        summary[config] = {
            "emails_per_s_median": statistics.median(rates),
            "emails_per_s": rates,
            "per_email": best["per_email"],
            "first_acceptance_s": best["first_acceptance_s"],
            "dispatched_s": best["dispatched_s"],
            "elapsed_s": best["elapsed_s"],
            "cpu_utilisation": best["cpu_utilisation"],
            "idle_per_second": next(
                (r["idle_per_second"] for r in mine if "idle_per_second" in r), None
            ),
        }
        p = best["per_email"]
        out.append(f"{config}: {CONFIGS[config]}")
        out.append(
            f"  throughput {statistics.median(rates):.0f} emails/s (rounds: "
            + ", ".join(f"{x:.0f}" for x in rates)
            + f"); first email {best['first_acceptance_s']:.2f} s after due; "
            f"CPU busy {best['cpu_utilisation']:.0%} of the machine"
        )
        out.append(
            f"  per email: {p['statements']} statements (+{p['transaction_control']} "
            f"BEGIN/COMMIT, +{p['fk_checks']} foreign-key checks inside them), "
            f"{p['commits']} commits ({p['commit_records']} writing), "
            f"exec {p['exec_ms']:.3f} ms + plan {p['plan_ms']:.3f} ms, "
            f"WAL {p['wal_bytes']} B ({p['wal_fpi_bytes']} B full pages), "
            f"{p['redis_commands']} Redis commands, {p['smtp_bytes']} B to SMTP "
            f"({p['message_bytes']} B of message)"
        )
        cpu = p["cpu_ms"]
        out.append(
            f"  CPU per email: {p['cpu_ms_total']:.3f} ms = "
            + ", ".join(f"{k} {v:.3f}" for k, v in cpu.items() if v)
        )
        if summary[config]["idle_per_second"]:
            idle = summary[config]["idle_per_second"]
            out.append(
                f"  idle, per second: {idle['statements']} statements, {idle['commits']} "
                f"commits, {idle['redis_commands']} Redis commands, CPU ms "
                + ", ".join(f"{k} {v}" for k, v in idle["cpu_ms"].items() if v)
            )
        top = best["top_statements"][:6]
        for s in top:
            out.append(
                f"    {s['calls'] / best['recipients']:6.3f}/email "
                f"{s['exec_ms'] / max(s['calls'], 1):7.3f} ms/call "
                f"{s.get('buffers', 0) / max(s['calls'], 1):7.1f} buffers/call  {s['query'][:100]}"
            )
    if "direct" in summary:
        base = summary["direct"]["emails_per_s_median"]
        for other in ("direct-unprepared", "pgbouncer"):
            if other in summary:
                pairs = [
                    b["emails_per_s"] / a["emails_per_s"]
                    for a, b in zip(
                        [r for r in runs if r["config"] == "direct"],
                        [r for r in runs if r["config"] == other],
                        strict=False,
                    )
                ]
                ratio = statistics.median(pairs)
                summary[other]["ratio_to_direct"] = round(ratio, 3)
                out.append(
                    f"ratio {other}/direct: median {ratio:.2f} over {len(pairs)} round(s) "
                    f"({', '.join(f'{x:.2f}' for x in pairs)}); medians "
                    f"{summary[other]['emails_per_s_median']:.0f} vs {base:.0f} emails/s"
                )
    if "direct-unprepared" in summary and "pgbouncer" in summary:
        pairs = [
            b["emails_per_s"] / a["emails_per_s"]
            for a, b in zip(
                [r for r in runs if r["config"] == "direct-unprepared"],
                [r for r in runs if r["config"] == "pgbouncer"],
                strict=False,
            )
        ]
        summary["pgbouncer"]["ratio_to_unprepared"] = round(statistics.median(pairs), 3)
        out.append(
            f"ratio pgbouncer/direct-unprepared (PgBouncer's own cost): median "
            f"{statistics.median(pairs):.2f} ({', '.join(f'{x:.2f}' for x in pairs)})"
        )
    return out, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--recipients", type=int, default=None, help="10,000 unless --quick")
    parser.add_argument("--rounds", type=int, default=None, help="every configuration N times")
    parser.add_argument("--pgbouncer", action="store_true", help="all three configurations")
    parser.add_argument(
        "--workers", type=int, default=1, help="worker instances (x2 processes); peak.py: 2"
    )
    parser.add_argument("--configs", default=None, help=f"comma-separated: {','.join(CONFIGS)}")
    parser.add_argument("--idle-seconds", type=float, default=None, help="10 unless --quick")
    parser.add_argument("--durable", action="store_true", help="fsync, sync commit, full pages")
    parser.add_argument(
        "--track-planning", action="store_true", help="pg_stat_statements.track_planning (slower)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--quick", action="store_true", help="small, for tests")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (role logs)")
    opts = parser.parse_args(argv)
    opts.recipients = opts.recipients or (QUICK_RECIPIENTS if opts.quick else 10_000)
    opts.rounds = opts.rounds or 1
    if opts.idle_seconds is None:
        opts.idle_seconds = 0.0 if opts.quick else 10.0
    if opts.configs:
        configs = [c.strip() for c in opts.configs.split(",") if c.strip()]
    else:
        configs = list(CONFIGS) if opts.pgbouncer else ["direct"]
    if unknown := [c for c in configs if c not in CONFIGS]:
        parser.error(f"--configs: unknown {', '.join(unknown)}")
    if opts.recipients < 1 or opts.rounds < 1 or opts.workers < 1:
        parser.error("--recipients, --rounds and --workers take 1 or more")

    def run(workdir: Path, stack: contextlib.ExitStack) -> int:
        started = time.monotonic()
        bench = Bench(workdir, stack, opts.durable, opts.track_planning)
        say(f"private PostgreSQL on {bench.pg.port} (pg_stat_statements), Redis {bench.redis.port}")
        broadcast_id = build_template(bench, opts.recipients)
        say(f"template seeded: {opts.recipients} families in {time.monotonic() - started:.0f} s")
        runs: list[dict] = []
        for round_no in range(1, opts.rounds + 1):
            for config in configs:
                result = run_one(bench, config, round_no, broadcast_id, opts)
                runs.append(result)
                say(
                    f"round {round_no} {config}: {result['emails_per_s']:.0f} emails/s, "
                    f"{result['per_email']['statements']} statements and "
                    f"{result['per_email']['cpu_ms_total']:.3f} ms CPU per email, "
                    f"exactly once: {result['exactly_once']}"
                )
        lines, summary = report_lines(runs, configs)
        header = run_header("capacity.py")
        mode = (
            "durable (fsync, synchronous_commit, full_page_writes on)"
            if opts.durable
            else ("fast (fsync, synchronous_commit, full_page_writes off, as bench/peak.py)")
        )
        print("\n" + "\n".join([*header, f"cluster: {mode}", "", *lines]), flush=True)
        if opts.json:
            opts.json.write_text(
                json.dumps(
                    {
                        "header": header,
                        "durable": opts.durable,
                        "recipients": opts.recipients,
                        "cpus": os.cpu_count(),
                        "workers": opts.workers,
                        "roles": f"{opts.workers} x celery worker -Q periodic,send "
                        "--concurrency 2, 1 beat",
                        "summary": summary,
                        "runs": runs,
                    },
                    indent=2,
                )
            )
        return 0 if all(r["exactly_once"] for r in runs) else 1

    return run_in_workdir(run, name="capacity", keep=opts.keep, log_tails=True)


if __name__ == "__main__":
    sys.exit(main())
