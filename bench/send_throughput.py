"""End-to-end send throughput of the pipeline against a bare SMTP loop, measured in one run.

    .venv/bin/python bench/send_throughput.py [--recipients 10000] [--concurrency 2]
        [--no-pipelining] [--log-level INFO] [--rounds 3]

Baseline: Django's SMTP backend in a bare loop over one reused connection (no database, no
Celery, no bookkeeping). Pipeline: a broadcast to N distinct addresses made due, then
dispatched, fanned out, claimed, sent and recorded by one Celery worker with a pool of
``--concurrency`` processes; the clock runs from "due" to "every delivery terminal".
Both send to the same kind of local SMTP sink (bench/smtp_sink.py, its own process), which
offers PIPELINING like real mail servers unless ``--no-pipelining`` (Django's backend never
pipelines; the pipeline does when offered). The worker logs as in production (INFO, one JSON
line per state change) into a temporary file. The figure that matters is the ratio, since the
machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "edsmart.settings")
os.environ.setdefault("SECRET_KEY", "bench-only-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/edsmart_bench")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/11")
os.environ.setdefault("LOG_JSON", "1")
os.environ.setdefault("ALLOWED_HOSTS", "localhost")
SINK_ARGS: list[str] = []  # extra arguments for bench/smtp_sink.py, from the command line


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_sink() -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "smtp_sink.py"), str(port), *SINK_ARGS],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc, port


def stop_sink(proc: subprocess.Popen) -> int:
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    return int(out.strip().split()[-1])


def prepare_database() -> None:
    import psycopg

    name = os.environ["DATABASE_URL"].rsplit("/", 1)[1]
    with psycopg.connect("postgres://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "migrate", "-v0"], check=True, cwd=ROOT
    )


def baseline(n: int) -> float:
    from django.core.mail import EmailMultiAlternatives
    from django.core.mail.backends.smtp import EmailBackend

    proc, port = start_sink()
    backend = EmailBackend(host="127.0.0.1", port=port, timeout=10)
    backend.open()
    start = time.perf_counter()
    for i in range(n):
        msg = EmailMultiAlternatives(
            "Excursion to the zoo",
            "Dear parent,\n\nPlease read this.\n",
            "School <noreply@edsmart.localhost>",
            [f"parent{i}@example.org"],
            connection=backend,
        )
        msg.attach_alternative("<p>Dear parent,</p><p>Please read this.</p>", "text/html")
        backend.send_messages([msg])
    elapsed = time.perf_counter() - start
    backend.close()
    assert stop_sink(proc) == n
    return n / elapsed


def seed_broadcast(n: int) -> int:
    from django.db import connection

    from slips.models import Audience, Broadcast, Guardian, School, SendStatus, Student

    school = School.objects.create(name="Bench School", slug="bench")
    students = Student.objects.bulk_create(
        [Student(school=school, first_name=f"Kid{i}", last_name="Bench") for i in range(n)],
        batch_size=5000,
    )
    guardians = Guardian.objects.bulk_create(
        [
            Guardian(
                school=school,
                name=f"Parent {i}",
                email=f"parent{i}@example.org",
                email_normalized=f"parent{i}@example.org",
            )
            for i in range(n)
        ],
        batch_size=5000,
    )
    link = Guardian.students.through
    link.objects.bulk_create(
        [link(guardian_id=g.pk, student_id=s.pk) for g, s in zip(guardians, students, strict=True)],
        batch_size=5000,
    )
    with connection.cursor() as cur:
        cur.execute("ANALYZE")  # as autovacuum would have done on a live database
    audience = Audience.objects.create(school=school, name="Everyone", whole_school=True)
    # Created as scheduled in the future, made due when the clock starts.
    b = Broadcast.objects.create(
        school=school,
        title="Excursion to the zoo",
        body="Dear families,\n\nPlease read this.",
        audience=audience,
        status=SendStatus.SCHEDULED,
        send_at="2100-01-01T00:00:00Z",
    )
    return b.pk


def pipeline_run(n: int, concurrency: int, log_level: str) -> tuple[float, dict]:
    import django

    django.setup()
    import redis
    from django.conf import settings
    from django.db.models import Count
    from django.utils import timezone

    from notifications.models import TERMINAL_STATUSES, Delivery
    from slips.models import Broadcast

    redis.Redis.from_url(settings.REDIS_URL).flushdb()
    broadcast_id = seed_broadcast(n)
    sink, port = start_sink()
    env = {
        **os.environ,
        "EMAIL_HOST": "127.0.0.1",
        "EMAIL_PORT": str(port),
        "LOG_LEVEL": log_level,
    }
    log_file = tempfile.NamedTemporaryFile(prefix="edsmart-bench-worker-", suffix=".log")  # noqa: SIM115
    worker = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "celery"),
            "-A",
            "edsmart",
            "worker",
            "-Q",
            "periodic,send",
            "--concurrency",
            str(concurrency),
            "-l",
            log_level,
            "--without-gossip",
            "--without-mingle",
        ],
        cwd=ROOT,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    try:
        time.sleep(6)  # let the pool start before the clock does
        from notifications.tasks import dispatch_due

        start = time.perf_counter()
        Broadcast.objects.filter(pk=broadcast_id).update(send_at=timezone.now())
        dispatch_due.delay()
        fanned_out = None
        while True:
            time.sleep(0.2)
            open_rows = Delivery.objects.exclude(status__in=list(TERMINAL_STATUSES)).count()
            total = Delivery.objects.count()
            if fanned_out is None and total == n:
                fanned_out = time.perf_counter() - start
            if total == n and open_rows == 0:
                break
            if time.perf_counter() - start > 600:
                raise SystemExit("pipeline did not finish in 10 minutes")
        elapsed = time.perf_counter() - start
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        log_file.seek(0)
        log_lines = sum(1 for _ in log_file)
        log_file.close()
    accepted = stop_sink(sink)
    counts = dict(Delivery.objects.values_list("status").annotate(n=Count("id")))
    assert accepted == n == counts.get("sent"), (accepted, counts)
    print(f"worker log: {log_lines} lines at {log_level}")
    print(f"fan-out of {n} rows visible after {fanned_out:.1f} s of {elapsed:.1f} s")
    return n / elapsed, counts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipients", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--no-pipelining", action="store_true", help="the sink offers none")
    parser.add_argument("--log-level", default="INFO", help="the worker's (production: INFO)")
    parser.add_argument("--rounds", type=int, default=3, help="baseline then pipeline, N times")
    args = parser.parse_args()
    if args.no_pipelining:
        SINK_ARGS.append("--no-pipelining")
    import django

    rows = []
    for round_no in range(1, args.rounds + 1):
        prepare_database()
        django.setup()
        base = baseline(args.recipients)
        rate, counts = pipeline_run(args.recipients, args.concurrency, args.log_level)
        rows.append((base, rate))
        print(
            f"round {round_no}: baseline {base:6.0f}/s  pipeline {rate:6.0f}/s  "
            f"ratio {rate / base:.2f}  statuses {counts}",
            flush=True,
        )
        from django.db import connections

        connections.close_all()
    bases, rates = sorted(b for b, _ in rows), sorted(r for _, r in rows)
    ratios = sorted(r / b for b, r in rows)
    mid = len(rows) // 2
    print(f"baseline (bare SMTP loop, one connection): {bases[mid]:8.0f} emails/s (median)")
    print(
        f"pipeline (due -> all recorded, 1 worker x{args.concurrency}): "
        f"{rates[mid]:8.0f} emails/s (median)"
    )
    print(f"ratio pipeline/baseline: median {ratios[mid]:.2f}, min {ratios[0]:.2f}")
    print(f"sink offered PIPELINING: {not args.no_pipelining}; worker log level {args.log_level}")


if __name__ == "__main__":
    main()
