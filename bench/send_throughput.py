"""End-to-end send throughput of the pipeline against three references, measured in one run.

    .venv/bin/python bench/send_throughput.py [--recipients 10000] [--concurrency 2]
        [--rounds 3] [--only baseline,floor,postoffice,pipeline] [--skip-postoffice]
        [--postoffice-batch-size 100] [--no-pipelining] [--log-level INFO]

Each round measures, one after the other, N emails to N distinct addresses four ways:

- baseline: Django's SMTP backend in a bare loop over one reused connection, one process (no
  database, no Celery, no bookkeeping), with a small two-part message.
- floor: the design's floor, "plain smtplib plus one committed PostgreSQL UPDATE per email":
  ``--concurrency`` forked processes, each with its own psycopg connection (autocommit) and its
  own ``smtplib.SMTP`` connection, each taking its share of the rows of a table
  ``bench_floor`` made in the bench database. Per email: fill the recipient's address and
  signed link into one serialized template (text and HTML parts, about the pipeline's size),
  ``UPDATE bench_floor SET status='sent', sent_at=now() WHERE id=%s`` committed, then
  ``sendmail``. The clock runs from starting the processes to the last one done. This is the
  strict reference the pipeline is held to (at least 0.7x).
- floor-mime: the same, but each email built from scratch as a MIME message (Django's
  EmailMultiAlternatives), as a simple sender would; building is about half its cost.
- post-office: django-post-office (the ``bench`` extra, run under ``bench.postoffice_settings``
  with a database of its own, the bench database's name plus ``_po``): the same emails queued
  with ``priority='medium'`` (off the clock), then ``send_queued_mail --processes
  <concurrency>`` with post_office's defaults, timed in its process once Django is set up
  (bench/postoffice_steps.py). Its BATCH_SIZE (100) moves its figure most: a fork pool and
  fresh SMTP connections per batch; ``--postoffice-batch-size`` changes it. It marks a batch
  sent after sending it (a crash resends the batch), so it pays less per email than the floor.
- pipeline: a broadcast to N addresses made due, then dispatched, fanned out, claimed, sent and
  recorded by one Celery worker with a pool of ``--concurrency`` processes; the clock runs from
  "due" to the time the last delivery's outcome was recorded (its ``updated_at``). Its worker
  logs as in production (INFO: a JSON line per chunk of accepted sends, per claim and per
  other outcome) into a temporary file.

Each gets a fresh SMTP sink (bench/smtp_sink.py, its own process), which offers PIPELINING like
real mail servers unless ``--no-pipelining`` (Django's backend and smtplib never pipeline; the
pipeline does when offered). Every measurement checks that the sink accepted exactly N
messages and (but the baseline, which has none) that its database recorded N sent, and prints
the messages' average size. The pipeline's clock also holds its fan-out, which makes the rows
that floor and post-office are given ready-made before their clocks start. The
figures that matter are the ratios (pipeline/floor, pipeline/post-office, pipeline/baseline),
since the machine is shared and noisy; with several rounds the medians are printed at the end.
``--only`` picks measurements (``--only floor,postoffice`` needs neither Celery nor the
project's migrations); ``--skip-postoffice`` leaves out the slowest to set up.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from django.core.mail import EmailMultiAlternatives

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "edsmart.settings")
os.environ.setdefault("SECRET_KEY", "bench-only-secret-key-0123456789-abcdefghijklmnopqrstuvwxyz")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/edsmart_bench")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/11")
os.environ.setdefault("LOG_JSON", "1")
os.environ.setdefault("ALLOWED_HOSTS", "localhost")
SINK_ARGS: list[str] = []  # extra arguments for bench/smtp_sink.py, from the command line
MEASUREMENTS = ("baseline", "floor", "floor_mime", "postoffice", "pipeline")
LABELS = {
    "baseline": "baseline",
    "floor": "floor",
    "floor_mime": "floor-mime",
    "postoffice": "post-office",
    "pipeline": "pipeline",
}
ADMIN_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/postgres"
FROM_ADDRESS = "noreply@edsmart.localhost"
FROM_HEADER = f"Bench School <{FROM_ADDRESS}>"
SUBJECT = "Excursion to the zoo"
BODY = "Dear families,\n\nPlease read this."
# The shape of the pipeline's broadcast email (notifications/templates/notifications/email/),
# written out as a simple sender would, so that floor and post-office send emails of its size.
TEXT = "Dear {name},\n\n{body}\n\nRead online: {link}\n\nBench School\n"
HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{subject}</title>
</head>
<body style="margin:0;padding:0;background:#f4f5f7;font-family:-apple-system,Segoe UI,Roboto,\
Arial,sans-serif;color:#1f2933;">
<div style="max-width:600px;margin:0 auto;padding:16px;">
  <p style="font-size:14px;color:#52606d;margin:0 0 8px;">Bench School</p>
  <div style="background:#fff;border-radius:8px;padding:20px;">
    <h1 style="font-size:20px;margin:0 0 16px;">{subject}</h1>
    <p>Dear {name},</p>
<div style="font-size:16px;line-height:1.5;"><p>Dear families,</p>

<p>Please read this.</p></div>
<p style="margin:24px 0;"><a href="{link}" style="color:#2563eb;">Read this online</a></p>
  </div>
</div>
</body>
</html>
"""


class SinkTotals(NamedTuple):
    accepted: int  # recipients
    messages: int
    message_bytes: int


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


def stop_sink(proc: subprocess.Popen) -> SinkTotals:
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    words = out.split()
    return SinkTotals(
        accepted=int(words[words.index("accepted") + 1]),
        messages=int(words[words.index("messages") + 1]),
        message_bytes=int(words[words.index("bytes") + 1]),
    )


def report(name: str, n: int, elapsed: float, how: str, totals: SinkTotals) -> None:
    """One line per measurement as soon as it is done, so a later failure loses nothing."""
    size = totals.message_bytes // max(totals.messages, 1)
    print(
        f"  {LABELS[name]:<11} {n / elapsed:7.0f} emails/s  ({n} in {elapsed:.2f} s, {how}, "
        f"{size} bytes per message)",
        flush=True,
    )


def database_name(suffix: str = "") -> str:
    return os.environ["DATABASE_URL"].rsplit("/", 1)[1].split("?", 1)[0] + suffix


def recreate_database(name: str) -> None:
    import psycopg

    with psycopg.connect(ADMIN_DATABASE_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def prepare_database(*, migrate: bool) -> None:
    """A fresh bench database each round; the project's migrations only for the pipeline (the
    floor needs just its own table, and must not break when the project's models are mid-edit)."""
    recreate_database(database_name())
    if migrate:
        subprocess.run(
            [sys.executable, str(ROOT / "manage.py"), "migrate", "-v0"], check=True, cwd=ROOT
        )


def recipient(row: int) -> str:
    return f"parent{row}@example.org"


def email_parts(row: int) -> tuple[str, str, str, dict[str, str]]:
    """Subject, text, HTML and extra headers of one email, as a simple sender would make them:
    a signed link per recipient (as the pipeline's parent links are), formatted into the text
    and the HTML. Shared by floor and post-office so that they send the same emails."""
    from django.core import signing

    link = f"http://127.0.0.1:8000/p/{signing.dumps({'d': row + 1}, salt='bench.link')}/"
    name = f"Parent {row}"
    text = TEXT.format(name=name, body=BODY, link=link)
    html = HTML.format(name=name, subject=SUBJECT, link=link)
    headers = {
        "Message-ID": f"<bench.{row}@edsmart.localhost>",
        "Auto-Submitted": "auto-generated",
    }
    return SUBJECT, text, html, headers


def floor_email(row: int, to: str) -> EmailMultiAlternatives:
    from django.core.mail import EmailMultiAlternatives

    subject, text, html, headers = email_parts(row)
    email = EmailMultiAlternatives(subject, text, FROM_HEADER, [to], headers=headers)
    email.attach_alternative(html, "text/html")
    return email


def baseline(n: int) -> float:
    """The existing reference: how fast Django's SMTP backend alone goes, one process."""
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
    totals = stop_sink(proc)
    assert totals.accepted == n, totals
    report("baseline", n, elapsed, "1 process, 1 connection", totals)
    return n / elapsed


def prebuilt_email(row: int, to: str, template: bytes) -> bytes:
    """The floor's email: serialized once, then per recipient only the address and the signed
    link change (as the pipeline's stencil does): the least a careful sender pays per email."""
    from django.core import signing

    link = signing.dumps({"d": row + 1}, salt="bench.link")
    return (
        template.replace(b"TO-ADDRESS", to.encode())
        .replace(b"LINK-TOKEN", link.encode())
        .replace(b"ROW-NUMBER", str(row).encode())
    )


def floor_template() -> bytes:
    from django.core.mail import EmailMultiAlternatives

    link = "http://127.0.0.1:8000/p/LINK-TOKEN/"
    name = "Parent ROW-NUMBER"
    text = TEXT.format(name=name, body=BODY, link=link)
    html = HTML.format(name=name, subject=SUBJECT, link=link)
    headers = {"Message-ID": "<bench.ROW-NUMBER@edsmart.localhost>"}
    email = EmailMultiAlternatives(SUBJECT, text, FROM_HEADER, ["TO-ADDRESS"], headers=headers)
    email.attach_alternative(html, "text/html")
    template = email.message().as_bytes(linesep="\r\n")
    assert template.count(b"LINK-TOKEN") == 2 and b"TO-ADDRESS" in template, template
    return template


def floor_sender(database_url: str, port: int, share: int, shares: int, mime: bool) -> None:
    """One floor process: its own rows, its own database and SMTP connections, and per email
    the least that still records it durably (one committed UPDATE) before handing it over."""
    import smtplib

    import psycopg

    template = floor_template()

    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT id, email FROM bench_floor WHERE mod(id, %s) = %s ORDER BY id",
            (shares, share),
        ).fetchall()
        smtp = smtplib.SMTP("127.0.0.1", port, timeout=10)
        for row_id, to in rows:
            if mime:
                message = floor_email(row_id - 1, to).message().as_bytes(linesep="\r\n")
            else:
                message = prebuilt_email(row_id - 1, to, template)
            conn.execute(
                "UPDATE bench_floor SET status = 'sent', sent_at = now() WHERE id = %s",
                (row_id,),
            )
            smtp.sendmail(FROM_ADDRESS, [to], message)
        smtp.quit()


def floor(n: int, concurrency: int, *, mime: bool) -> float:
    """The design floor: what any exactly-once-minded sender must at least pay per email.
    ``mime``: each email built as a MIME message from scratch (Django's classes) rather than
    filled into one serialized template."""
    import psycopg

    database_url = os.environ["DATABASE_URL"]
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_floor")
        conn.execute(
            "CREATE TABLE bench_floor (id bigserial PRIMARY KEY, email text NOT NULL, "
            "status text NOT NULL DEFAULT 'queued', sent_at timestamptz)"
        )
        conn.execute(
            "INSERT INTO bench_floor (email) "
            "SELECT 'parent' || i || '@example.org' FROM generate_series(0, %s - 1) AS i",
            (n,),
        )
        conn.execute("ANALYZE bench_floor")
    # Settings and the email modules loaded once here, inherited by the forks, off the clock.
    floor_email(0, recipient(0)).message()
    sink, port = start_sink()
    context = multiprocessing.get_context("fork")
    senders = [
        context.Process(target=floor_sender, args=(database_url, port, share, concurrency, mime))
        for share in range(concurrency)
    ]
    start = time.perf_counter()
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    elapsed = time.perf_counter() - start
    totals = stop_sink(sink)
    assert all(sender.exitcode == 0 for sender in senders), [s.exitcode for s in senders]
    with psycopg.connect(database_url) as conn:
        sent = conn.execute(
            "SELECT count(*) FROM bench_floor WHERE status = 'sent' AND sent_at IS NOT NULL"
        ).fetchone()[0]
    assert totals.accepted == n == sent, (totals, sent)
    report("floor_mime" if mime else "floor", n, elapsed, f"{concurrency} processes", totals)
    return n / elapsed


def postoffice_step(*args: str) -> str:
    """One step's output; its log (Django's start-up lines) is shown only when it fails."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "postoffice_steps.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-5000:])
        raise SystemExit(f"bench/postoffice_steps.py {' '.join(args)} exited {result.returncode}")
    return result.stdout


def postoffice(n: int, concurrency: int, batch_size: int) -> float:
    """django-post-office's ``send_queued_mail`` over the same emails, as it ships (but for
    ``batch_size``, its BATCH_SIZE, 100 unless told)."""
    os.environ["BENCH_PO_BATCH_SIZE"] = str(batch_size)  # read by bench.postoffice_settings
    recreate_database(database_name("_po"))
    postoffice_step("migrate")
    postoffice_step("queue", str(n))
    sink, port = start_sink()
    env = {**os.environ, "EMAIL_HOST": "127.0.0.1", "EMAIL_PORT": str(port)}
    with (
        tempfile.TemporaryDirectory(prefix="edsmart-bench-po-") as workdir,
        open(Path(workdir) / "send.log", "w+") as log,
    ):
        started = time.perf_counter()
        proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "bench" / "postoffice_steps.py"),
                "send",
                str(concurrency),
                str(Path(workdir) / "send"),
            ],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        assert proc.stdout.readline().strip() == "ready"
        set_up = time.perf_counter() - started
        out, _ = proc.communicate("go\n", timeout=600)
        log.seek(0)
        log_lines = log.readlines()
        if proc.returncode != 0:
            sys.stderr.writelines(log_lines[-30:])
            raise SystemExit(f"send_queued_mail exited {proc.returncode}")
    elapsed = float(out.split()[out.split().index("elapsed") + 1])
    totals = stop_sink(sink)
    counts = json.loads(postoffice_step("count"))
    assert totals.accepted == n == counts.get("sent"), (totals, counts)
    print(
        f"post-office: {len(log_lines)} log lines; the command's process took {set_up:.1f} s "
        "to start (not on the clock)"
    )
    report("postoffice", n, elapsed, f"--processes {concurrency}, BATCH_SIZE {batch_size}", totals)
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
    """The pipeline as deployed: due -> dispatched -> fanned out -> sent -> recorded."""
    import django

    django.setup()
    import redis
    from django.conf import settings
    from django.db.models import Count, Max
    from django.utils import timezone

    from notifications.models import TERMINAL_STATUSES, Delivery, DeliveryStatus, Mailing
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
        due = timezone.now()
        Broadcast.objects.filter(pk=broadcast_id).update(send_at=due)
        dispatch_due.delay()
        fanned_out = None
        # Polled cheaply (the open statuses are in partial indexes; counting the whole table
        # five times a second took about 5% of a core from the run it measures); the clock
        # stops at the last row's recorded time, not at the poll that saw it.
        open_statuses = [s for s in DeliveryStatus.values if s not in TERMINAL_STATUSES]
        while True:
            time.sleep(0.2)
            if fanned_out is None and Mailing.objects.filter(recipient_count=n).exists():
                fanned_out = time.perf_counter() - start
            if fanned_out is not None and not (
                Delivery.objects.filter(status__in=open_statuses).exists()
            ):
                break
            if time.perf_counter() - start > 600:
                raise SystemExit("pipeline did not finish in 10 minutes")
        last = Delivery.objects.aggregate(last=Max("updated_at"))["last"]
        elapsed = (last - due).total_seconds()
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        log_file.seek(0)
        log_lines = sum(1 for _ in log_file)
        log_file.close()
    totals = stop_sink(sink)
    counts = dict(Delivery.objects.values_list("status").annotate(n=Count("id")))
    assert totals.accepted == n == counts.get("sent"), (totals, counts)
    print(f"worker log: {log_lines} lines at {log_level}")
    print(f"fan-out of {n} rows visible after {fanned_out:.1f} s of {elapsed:.1f} s")
    report("pipeline", n, elapsed, f"1 worker x{concurrency}", totals)
    return n / elapsed, counts


def ratio_line(rates: dict[str, float]) -> str:
    parts = [f"{LABELS[name]} {rates[name]:.0f}/s" for name in MEASUREMENTS if name in rates]
    if "pipeline" in rates:
        parts += [
            f"pipeline/{LABELS[name]} {rates['pipeline'] / rates[name]:.2f}"
            for name in ("floor", "floor_mime", "postoffice", "baseline")
            if name in rates
        ]
    return "  ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipients", type=int, default=10_000)
    parser.add_argument(
        "--concurrency", type=int, default=2, help="the worker pool, floor and post-office"
    )
    parser.add_argument("--no-pipelining", action="store_true", help="the sink offers none")
    parser.add_argument("--log-level", default="INFO", help="the worker's (production: INFO)")
    parser.add_argument("--rounds", type=int, default=3, help="every measurement, N times")
    parser.add_argument(
        "--only",
        default=",".join(MEASUREMENTS),
        help=f"comma-separated, from {','.join(MEASUREMENTS)}",
    )
    parser.add_argument("--skip-postoffice", action="store_true", help="for quick runs")
    parser.add_argument(
        "--postoffice-batch-size",
        type=int,
        default=100,
        help="post_office's BATCH_SIZE (its default: 100); moves its figure the most",
    )
    args = parser.parse_args()
    chosen = {name.strip() for name in args.only.split(",") if name.strip()}
    if unknown := chosen - set(MEASUREMENTS):
        parser.error(f"--only: unknown {', '.join(sorted(unknown))}")
    if args.skip_postoffice:
        chosen.discard("postoffice")
    if not chosen:
        parser.error("nothing to measure")
    if args.no_pipelining:
        SINK_ARGS.append("--no-pipelining")

    rounds: list[dict[str, float]] = []
    for round_no in range(1, args.rounds + 1):
        print(f"round {round_no}:", flush=True)
        prepare_database(migrate="pipeline" in chosen)
        rates: dict[str, float] = {}
        counts: dict = {}
        if "baseline" in chosen:
            rates["baseline"] = baseline(args.recipients)
        if "floor" in chosen:
            rates["floor"] = floor(args.recipients, args.concurrency, mime=False)
        if "floor_mime" in chosen:
            rates["floor_mime"] = floor(args.recipients, args.concurrency, mime=True)
        if "postoffice" in chosen:
            rates["postoffice"] = postoffice(
                args.recipients, args.concurrency, args.postoffice_batch_size
            )
        if "pipeline" in chosen:
            rates["pipeline"], counts = pipeline_run(
                args.recipients, args.concurrency, args.log_level
            )
            from django.db import connections

            connections.close_all()
        rounds.append(rates)
        statuses = f"  statuses {counts}" if counts else ""
        print(f"round {round_no}: {ratio_line(rates)}{statuses}", flush=True)

    print(f"medians of {len(rounds)} round(s), {args.recipients} emails each:")
    how = {
        "baseline": "bare Django SMTP loop, one connection",
        "floor": f"smtplib + one committed UPDATE per email, {args.concurrency} processes",
        "floor_mime": f"the floor, each email a new MIME message, {args.concurrency} processes",
        "postoffice": (
            f"django-post-office send_queued_mail --processes {args.concurrency}, "
            f"BATCH_SIZE {args.postoffice_batch_size}"
        ),
        "pipeline": f"due -> all recorded, 1 worker x{args.concurrency}",
    }
    for name in MEASUREMENTS:
        if name in chosen:
            median = statistics.median(r[name] for r in rounds)
            print(f"  {LABELS[name]:<11} {median:8.0f} emails/s  ({how[name]})")
    if "pipeline" in chosen:
        for name in ("floor", "floor_mime", "postoffice", "baseline"):
            if name in chosen:
                ratios = [r["pipeline"] / r[name] for r in rounds]
                print(
                    f"  ratio pipeline/{LABELS[name]}: median {statistics.median(ratios):.2f}, "
                    f"min {min(ratios):.2f}"
                )
    worker = f"; worker log level {args.log_level}" if "pipeline" in chosen else ""
    print(f"sink offered PIPELINING: {not args.no_pipelining}{worker}")


if __name__ == "__main__":
    main()
