"""The watch: find what is wrong with sending, raise one alert per condition, clear it after.

Conditions (each an ``Alert.key``):

- ``backlog:school:<id>``   due deliveries of a school have waited longer than a threshold
- ``failure_rate``          recent failed / (failed + sent) is above a threshold
- ``unknown:school:<id>``   any delivery of a school has an ``unknown`` outcome
- ``beat_silent``           beat's heartbeat is older than a threshold (or missing)
- ``workers_silent``        no worker has shown life recently
- ``duplicate:<mailing>:<address hash>``  a (message, address) pair was accepted twice
- ``credentials_refused``   sending is paused because the provider refused our credentials
- ``database_down``         the watch could not reach the database (told by email and Sentry
                            directly, once per outage, since no alert row can be written)

Raising is ``INSERT ... ON CONFLICT DO NOTHING`` against the partial unique index "one open
alert per key": two watches at once both see the condition, one inserts, one finds it open,
so ops are told once. An alert clears when a watch no longer finds its condition; if the
condition comes back later, that is a new alert and a new notification.

A duplicate is a fact that history keeps: its alert stays open as the record of it. The
circuit breaker (pause that school) fires in the same transaction as the insert, so it trips
exactly once per duplicated pair; ops can resume the school after investigating without the
next watch pausing it again, and a *new* duplicate trips it again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from dataclasses import dataclass, field

import redis
import sentry_sdk
from django.conf import settings
from django.core.mail import get_connection, send_mail
from django.db import InterfaceError, OperationalError, connection, transaction
from django.utils import timezone

from edsmart.redis_client import redis_client
from notifications import controls, heartbeats, selectors
from notifications.models import Alert, DeliveryStatus, Mailing, SendingSwitch
from slips.models import School

log = logging.getLogger("edsmart.alerts")

S = DeliveryStatus
CIRCUIT_BREAKER = "circuit-breaker"


def _setting(name: str) -> float:
    return float(getattr(settings, name))


def backlog_max_age() -> float:
    return _setting("EDSMART_ALERT_BACKLOG_SECONDS")


def failure_rate_max() -> float:
    return _setting("EDSMART_ALERT_FAILURE_RATE")


def failure_window() -> float:
    return _setting("EDSMART_ALERT_FAILURE_WINDOW_SECONDS")


def failure_min_count() -> int:
    # One failure out of one send is 100%, and says nothing about the mail server.
    return int(_setting("EDSMART_ALERT_FAILURE_MIN_COUNT"))


def ops_emails() -> list[str]:
    return list(settings.EDSMART_OPS_EMAILS)


def alert_email_backend() -> str | None:
    """Alerts may leave by another road than parents' mail: when the provider is what broke,
    an alert sent through it would break with it. None means EMAIL_BACKEND."""
    return settings.EDSMART_ALERT_EMAIL_BACKEND or None


def failure_rate(*, window_seconds: float | None = None) -> selectors.FailureRate:
    """Sends recorded in the failure window (or the one given)."""
    window = window_seconds or failure_window()
    return selectors.failure_rate(since=timezone.now() - dt.timedelta(seconds=window))


# --- conditions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    key: str
    kind: str
    severity: str
    message: str
    school_id: int | None = None
    tags: dict[str, str] = field(default_factory=dict)

    # What an alert row takes from it, in ``_alerts_insert``'s order.
    COLUMNS = ("key", "kind", "severity", "school_id", "message")


def _school_names(ids: set[int]) -> dict[int, str]:
    return dict(School.objects.filter(pk__in=ids).values_list("pk", "name")) if ids else {}


def conditions_now() -> list[Condition]:
    """Everything that is wrong right now, as alert conditions (no side effects)."""
    found: list[Condition] = []
    stats = selectors.school_stats()
    names = _school_names({pk for pk, st in stats.items() if st.backlog or st.unknown})
    paused = set(School.objects.filter(sending_paused=True).values_list("pk", flat=True))
    limit = backlog_max_age()
    for school_id, st in sorted(stats.items()):
        name = names.get(school_id, f"school {school_id}")
        age = st.oldest_due_seconds
        if st.backlog and age is not None and age > limit:
            note = " (sending is paused for this school)" if school_id in paused else ""
            found.append(
                Condition(
                    key=f"backlog:school:{school_id}",
                    kind="backlog",
                    severity=Alert.Severity.WARNING,
                    school_id=school_id,
                    message=f"{name}: {st.backlog} deliveries due, the oldest waiting "
                    f"{age / 60:.0f} min (threshold {limit / 60:.0f} min){note}",
                )
            )
        if st.unknown:
            found.append(
                Condition(
                    key=f"unknown:school:{school_id}",
                    kind="unknown",
                    severity=Alert.Severity.WARNING,
                    school_id=school_id,
                    message=f"{name}: {st.unknown} deliveries with an unknown outcome need a "
                    "decision (resolve_unknown or the Delivery admin actions)",
                )
            )

    fr = failure_rate()
    if fr.failed + fr.sent >= failure_min_count() and fr.rate > failure_rate_max():
        found.append(
            Condition(
                key="failure_rate",
                kind="failure_rate",
                severity=Alert.Severity.CRITICAL,
                message=f"{fr.rate:.0%} of sends failed in the last "
                f"{failure_window() / 60:.0f} min ({fr.failed} failed, {fr.sent} sent; "
                f"threshold {failure_rate_max():.0%})",
            )
        )

    beat_age = heartbeats.beat_age_seconds()
    if beat_age is None or beat_age > heartbeats.beat_max_age():
        seen = "never seen" if beat_age is None else f"last seen {beat_age:.0f} s ago"
        found.append(
            Condition(
                key="beat_silent",
                kind="beat_silent",
                severity=Alert.Severity.CRITICAL,
                message=f"celery beat is silent ({seen}): nothing is dispatched or swept",
            )
        )
    if not heartbeats.workers_seen():
        found.append(
            Condition(
                key="workers_silent",
                kind="workers_silent",
                severity=Alert.Severity.CRITICAL,
                message=f"no Celery worker seen in the last {heartbeats.worker_max_age():.0f} s",
            )
        )

    switch = SendingSwitch.objects.filter(pk=1).first()
    if switch is not None and switch.paused and switch.changed_by == controls.CREDENTIALS_ACTOR:
        found.append(
            Condition(
                key="credentials_refused",
                kind="credentials_refused",
                severity=Alert.Severity.CRITICAL,
                message="sending is paused everywhere: the mail provider refused our "
                f"credentials ({switch.reason}). Fix the SMTP password or API key, then "
                "resume (manage.py sending resume); no recipient was failed for it",
            )
        )

    found += _duplicate_conditions()
    return found


def _duplicate_conditions() -> list[Condition]:
    dups = selectors.duplicate_sends()
    if not dups:
        return []
    mailings = dict(
        Mailing.objects.filter(pk__in={d["mailing_id"] for d in dups}).values_list(
            "pk", "school_id"
        )
    )
    out: dict[str, Condition] = {}
    for d in dups:
        school_id = mailings.get(d["mailing_id"])
        digest = hashlib.sha256(d["email"].encode()).hexdigest()[:16]
        key = f"duplicate:{d['mailing_id']}:{digest}"
        out.setdefault(
            key,
            Condition(
                key=key,
                kind="duplicate",
                severity=Alert.Severity.CRITICAL,
                school_id=school_id,
                message=f"DUPLICATE: mailing {d['mailing_id']} was accepted {d['accepted']} times "
                f"for one address; sending for the school is paused by the circuit breaker",
                tags={"mailing_id": str(d["mailing_id"])},
            ),
        )
    return list(out.values())


# --- raise, clear, notify ------------------------------------------------------------------


def _alert_insert(cond: Condition) -> int | None:
    """Open an alert for ``cond`` unless one is open already. Returns the new id, or None."""
    table = Alert._meta.db_table
    sql = f"""
        INSERT INTO {table} (key, kind, severity, school_id, message, raised_at, last_seen_at,
                             cleared_at, notified)
        VALUES (%s, %s, %s, %s, %s, statement_timestamp(), statement_timestamp(), NULL, false)
        ON CONFLICT (key) WHERE cleared_at IS NULL DO NOTHING
        RETURNING id
    """  # noqa: S608 - the table name comes from model _meta; values are parameters
    with connection.cursor() as cur:
        cur.execute(sql, [cond.key, cond.kind, cond.severity, cond.school_id, cond.message])
        row = cur.fetchone()
    return row[0] if row else None


def _trip_breaker(cond: Condition) -> None:
    school = School.objects.filter(pk=cond.school_id).first()
    if school is None:
        return
    controls.sending_set_paused(
        paused=True, actor=CIRCUIT_BREAKER, school=school, reason=cond.message[:300]
    )
    log.critical(
        "circuit breaker paused sending for %s",
        school.slug,
        extra={"school_id": school.pk, "alert_key": cond.key},
    )


@dataclass
class WatchReport:
    raised: list[str] = field(default_factory=list)
    still_open: list[str] = field(default_factory=list)
    cleared: list[str] = field(default_factory=list)
    notified: int = 0
    breaker_tripped: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return self.__dict__.copy()


DATABASE_DOWN_KEY = "edsmart:alert:database-down"


def watch() -> WatchReport:
    """One pass: evaluate, raise new alerts (tripping the breaker), refresh, clear, notify.

    With the database away no alert row can be written, so ops are told directly (email and
    Sentry), once per outage: Redis remembers that they were.
    """
    try:
        found = conditions_now()
    except (OperationalError, InterfaceError) as exc:
        _database_down(exc)
        raise
    _database_back()
    return _watch(found)


def _database_down(exc: BaseException) -> None:
    message = f"the database is unreachable: sending waits until it is back ({exc!r})"[:300]
    log.critical(message, extra={"alert_key": "database_down"})
    try:
        first = redis_client().set(DATABASE_DOWN_KEY, 1, nx=True, ex=3600)
    except redis.RedisError:
        first = True  # better told twice than not at all
    if not first:
        return
    alert = Alert(
        key="database_down",
        kind="database_down",
        severity=Alert.Severity.CRITICAL,
        message=message,
        raised_at=timezone.now(),
    )
    _to_sentry(alert, {})
    _by_email(alert)


def _database_back() -> None:
    try:
        if redis_client().delete(DATABASE_DOWN_KEY):
            log.warning("the database is reachable again", extra={"alert_key": "database_down"})
    except redis.RedisError:
        log.warning("could not clear the database-down marker in Redis", exc_info=True)


def _alerts_insert(conds: list[Condition]) -> set[str]:
    """``_alert_insert`` for many conditions in one statement: the keys newly opened."""
    if not conds:
        return set()
    table = Alert._meta.db_table
    sql = f"""
        INSERT INTO {table} (key, kind, severity, school_id, message, raised_at, last_seen_at,
                             cleared_at, notified)
        SELECT v.key, v.kind, v.severity, v.school_id, v.message, statement_timestamp(),
               statement_timestamp(), NULL, false
        FROM unnest(%s::text[], %s::text[], %s::text[], %s::bigint[], %s::text[])
             AS v(key, kind, severity, school_id, message)
        ON CONFLICT (key) WHERE cleared_at IS NULL DO NOTHING
        RETURNING key
    """  # noqa: S608 - the table name comes from model _meta; values are parameters
    columns = [[getattr(c, name) for c in conds] for name in Condition.COLUMNS]
    with connection.cursor() as cur:
        cur.execute(sql, columns)
        return {row[0] for row in cur.fetchall()}


def _alerts_refresh(conds: list[Condition]) -> None:
    """Alerts still open: their message as it reads now, and when they were last seen."""
    if not conds:
        return
    table = Alert._meta.db_table
    sql = f"""
        UPDATE {table} a SET message = v.message, last_seen_at = statement_timestamp()
        FROM unnest(%s::text[], %s::text[]) AS v(key, message)
        WHERE a.key = v.key AND a.cleared_at IS NULL
    """  # noqa: S608 - the table name comes from model _meta; values are parameters
    with connection.cursor() as cur:
        cur.execute(sql, [[c.key for c in conds], [c.message for c in conds]])


def _watch(found: list[Condition]) -> WatchReport:
    report = WatchReport()
    # Conditions but duplicates are opened in one statement (a watch at a thousand schools
    # may hold dozens); a duplicate trips the breaker in the transaction that opens it.
    opened = _alerts_insert([c for c in found if c.kind != "duplicate"])
    seen: list[Condition] = []
    for cond in found:
        if cond.kind == "duplicate":
            with transaction.atomic():
                new = _alert_insert(cond) is not None
                if new:
                    _trip_breaker(cond)
                    if cond.school_id is not None:
                        report.breaker_tripped.append(cond.school_id)
        else:
            new = cond.key in opened
        if new:
            report.raised.append(cond.key)
            log.error(
                "alert raised: %s",
                cond.message,
                extra={"alert_key": cond.key, "school_id": cond.school_id},
            )
        else:
            seen.append(cond)
            report.still_open.append(cond.key)
    _alerts_refresh(seen)

    keys = [c.key for c in found]
    to_clear = Alert.objects.filter(cleared_at__isnull=True).exclude(key__in=keys)
    report.cleared = list(to_clear.values_list("key", flat=True))
    to_clear.filter(key__in=report.cleared).update(cleared_at=timezone.now())
    for key in report.cleared:
        log.info("alert cleared: %s", key, extra={"alert_key": key})

    report.notified = alerts_notify(conditions={c.key: c for c in found})
    return report


def alerts_notify(*, conditions: dict[str, Condition] | None = None) -> int:
    """Tell ops about open alerts nobody was told about yet: Sentry and email, once each.

    Each alert is claimed with a conditional UPDATE before anyone is told, so two watches
    never both notify. If the email fails the claim is given back and the next watch retries.
    """
    conditions = conditions or {}
    sent = 0
    for alert in Alert.objects.filter(cleared_at__isnull=True, notified=False).order_by("id"):
        if not Alert.objects.filter(pk=alert.pk, notified=False).update(notified=True):
            continue
        cond = conditions.get(alert.key)
        _to_sentry(alert, cond.tags if cond else {})
        if not _by_email(alert):
            Alert.objects.filter(pk=alert.pk).update(notified=False)
            continue
        sent += 1
    return sent


def _to_sentry(alert: Alert, extra_tags: dict[str, str]) -> None:
    """A no-op unless sentry_sdk was initialised (SENTRY_DSN set)."""
    tags = {"alert_kind": alert.kind, "alert_key": alert.key, **extra_tags}
    if alert.school_id is not None:
        tags["school_id"] = str(alert.school_id)
    sentry_sdk.capture_message(
        alert.message,
        level="fatal" if alert.severity == Alert.Severity.CRITICAL else "warning",
        tags=tags,
        fingerprint=["edsmart-alert", alert.key],
    )


def _by_email(alert: Alert) -> bool:
    recipients = ops_emails()
    if not recipients:
        return True
    subject = f"[EdSmart {alert.severity}] {alert.message}"[:200].replace("\n", " ")
    body = (
        f"{alert.message}\n\nkey: {alert.key}\nraised: {alert.raised_at:%Y-%m-%d %H:%M:%S} UTC\n"
        f"ops page: {settings.SITE_URL}/ops/\nrunbook: docs/ops.md#{alert.kind}\n"
    )
    try:
        send_mail(
            subject,
            body,
            settings.DEFAULT_FROM_EMAIL,
            recipients,
            fail_silently=False,
            connection=get_connection(alert_email_backend()),
        )
    except Exception:  # any mail failure: log it, keep the alert for a retry
        log.exception("could not email alert %s to ops", alert.key)
        return False
    return True
