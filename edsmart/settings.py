"""EdSmart settings: one module, everything that varies read from the environment.

Every reader fails loudly (see ``edsmart.env``): a malformed value stops the process at start-up
instead of being silently replaced by a default.
"""

from __future__ import annotations

import datetime as dt
import os
import unicodedata
from pathlib import Path

from edsmart.env import (
    ConfigError,
    database_from_url,
    env_bool,
    env_float,
    env_int,
    env_list,
    env_str,
)

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DEBUG", default=False)

SECRET_KEY = env_str("SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ConfigError("SECRET_KEY must be set when DEBUG is off")
    SECRET_KEY = "insecure-development-key-only-used-with-DEBUG-on"  # noqa: S105

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1"] if DEBUG else [])
if not DEBUG and not ALLOWED_HOSTS:
    raise ConfigError("ALLOWED_HOSTS must be set when DEBUG is off")

INSTALLED_APPS = [
    "edsmart.apps.EdSmartAdminConfig",  # Django's admin, with EdSmart's site (the home page)
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_beat",
    "axes",
    "slips",
    "notifications",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes requires: it turns a locked-out login into the lock-out page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "edsmart.urls"
WSGI_APPLICATION = "edsmart.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "edsmart" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": database_from_url(
        env_str("DATABASE_URL", default="postgres://postgres@127.0.0.1:5432/edsmart")
    )
}
DATABASES["default"]["CONN_MAX_AGE"] = env_int("CONN_MAX_AGE", default=60, minimum=0)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
# Server-side prepared statements for the send pipeline's per-email statements (Django's own
# queries bind client-side and are unaffected). Turn off behind a transaction-mode pooler
# (PgBouncer before 1.21): a statement prepared on one server connection is unknown on the next.
# Off means none anywhere: psycopg's own default (prepare after 5 runs) would still prepare the
# pipeline's server-binding cursor, so the threshold becomes None (never), and
# notifications/transitions.py reads DB_PREPARED_STATEMENTS for its explicit ``prepare=``.
# DB_TRANSACTION_POOLER: DATABASE_URL is a transaction-mode pooler (PgBouncer). Then nothing may
# live in a session across transactions: no prepared statements (unless DB_PREPARED_STATEMENTS=1
# says the pooler tracks them: PgBouncer 1.21+ with max_prepared_statements), and no Django
# server-side cursors, whose WITH HOLD cursor outside a transaction outlives it.
DB_TRANSACTION_POOLER = env_bool("DB_TRANSACTION_POOLER", default=False)
DB_PREPARED_STATEMENTS = env_bool("DB_PREPARED_STATEMENTS", default=not DB_TRANSACTION_POOLER)
DATABASES["default"]["DISABLE_SERVER_SIDE_CURSORS"] = DB_TRANSACTION_POOLER
_db_options = DATABASES["default"]["OPTIONS"]
if DB_PREPARED_STATEMENTS:
    # A URL's query string gives text; psycopg needs a number.
    _db_options["prepare_threshold"] = int(_db_options.get("prepare_threshold", 5))
else:
    _db_options["prepare_threshold"] = None
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_str("REDIS_URL", default="redis://127.0.0.1:6379/0")

# django-axes first: it refuses a locked-out login before any password is checked. The model
# backend after it is the one that logs users in (and the one ``Client.force_login`` picks).
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-au"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if not DEBUG
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}

LOGIN_URL = "admin:login"

# --- Email -------------------------------------------------------------------------------------
EMAIL_BACKEND = env_str("EMAIL_BACKEND", default="django.core.mail.backends.smtp.EmailBackend")
EMAIL_HOST = env_str("EMAIL_HOST", default="127.0.0.1")
EMAIL_PORT = env_int("EMAIL_PORT", default=1025, minimum=1)
EMAIL_HOST_USER = env_str("EMAIL_HOST_USER", default="")
EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD", default="")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", default=False)
# Django's default is to wait forever; a stalled mail server would then pin a worker for good.
EMAIL_TIMEOUT = env_float("EMAIL_TIMEOUT", default=10.0, minimum=0.1)
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", default="noreply@edsmart.localhost")
SERVER_EMAIL = DEFAULT_FROM_EMAIL
SITE_URL = env_str("SITE_URL", default="http://127.0.0.1:8000").rstrip("/")

# --- Send pipeline (see ../shared/DESIGN.md) ---------------------------------------------------
EDSMART_BATCH_SIZE = env_int("EDSMART_BATCH_SIZE", default=100, minimum=1)
EDSMART_BATCH_PARALLELISM = env_int("EDSMART_BATCH_PARALLELISM", default=4, minimum=1)
EDSMART_MAX_ATTEMPTS = env_int("EDSMART_MAX_ATTEMPTS", default=5, minimum=1)
EDSMART_RETRY_BASE_SECONDS = env_float("EDSMART_RETRY_BASE_SECONDS", default=60.0, minimum=0)
EDSMART_RETRY_MAX_SECONDS = env_float("EDSMART_RETRY_MAX_SECONDS", default=3600.0, minimum=0)
# A claim lease is short and renewed every third of it while its batch is alive, so a killed
# worker's claims come back within a lease and a sweep; a submitting lease covers one SMTP
# exchange. A batch stops taking new emails after EDSMART_BATCH_SECONDS (the task's soft time
# limit must leave room for the email in flight).
EDSMART_CLAIM_LEASE_SECONDS = env_float("EDSMART_CLAIM_LEASE_SECONDS", default=8.0, minimum=1)
EDSMART_SUBMIT_LEASE_SECONDS = env_float(
    "EDSMART_SUBMIT_LEASE_SECONDS", default=EMAIL_TIMEOUT * 3 + 30, minimum=1
)
EDSMART_BATCH_SECONDS = env_float("EDSMART_BATCH_SECONDS", default=90.0, minimum=1)
# A claim whose worker vanished is given back; after this many, the delivery fails with the
# reason rather than cycling forever (an email that kills its worker, say).
EDSMART_MAX_LOST_CLAIMS = env_int("EDSMART_MAX_LOST_CLAIMS", default=10, minimum=1)
# An ``unknown`` outcome is held for a person. Automatic resending was removed: no backend here
# sends an idempotency key a provider honours, so a resend could only be a duplicate.
EDSMART_UNKNOWN_POLICY = env_str("EDSMART_UNKNOWN_POLICY", default="hold")
if EDSMART_UNKNOWN_POLICY != "hold":
    raise ConfigError(
        "EDSMART_UNKNOWN_POLICY must be 'hold': automatic resending of unknown outcomes was "
        "removed because no backend sends an idempotency key its provider honours"
    )
for _removed in ("EDSMART_IDEMPOTENT_BACKENDS", "EDSMART_IDEMPOTENCY_WINDOW_SECONDS"):
    if os.environ.get(_removed):
        raise ConfigError(
            f"{_removed} was removed with the automatic resend policy (no backend sends an "
            "idempotency key its provider honours); unset it"
        )
EDSMART_SWEEP_STALE_SECONDS = env_float("EDSMART_SWEEP_STALE_SECONDS", default=15.0, minimum=1)
# Parents' links stop working this many days after the slip's due date (or the broadcast).
EDSMART_LINK_EXPIRY_DAYS = env_int("EDSMART_LINK_EXPIRY_DAYS", default=60, minimum=1)
# Emails of one mailing are filled in from a stencil rendered once (notifications/stencil.py);
# off renders every email in full, for ruling the stencil out when something looks wrong.
EDSMART_EMAIL_STENCILS = env_bool("EDSMART_EMAIL_STENCILS", default=True)
EDSMART_MAX_BODY_BYTES = env_int("EDSMART_MAX_BODY_BYTES", default=100 * 1024, minimum=1)
# Roster upload in the admin (docs/roster-import.md): a larger file is refused before anything is
# stored; a confirmed file of more rows than EDSMART_ROSTER_INLINE_ROWS imports in a task.
EDSMART_ROSTER_MAX_BYTES = env_int("EDSMART_ROSTER_MAX_BYTES", default=5 * 1024 * 1024, minimum=1)
EDSMART_ROSTER_INLINE_ROWS = env_int("EDSMART_ROSTER_INLINE_ROWS", default=2000, minimum=0)
# Peak hour (notifications/ratelimit.py, notifications/fairshare.py): one send rate for every
# worker on every host, emails per second, 0 = no cap (set it to the provider's quota). After a
# throttling reply the rate halves and climbs back to the cap over the recovery time.
EDSMART_SEND_RATE = env_float("EDSMART_SEND_RATE", default=0.0, minimum=0)
EDSMART_SEND_RATE_RECOVERY_SECONDS = env_float(
    "EDSMART_SEND_RATE_RECOVERY_SECONDS", default=30.0, minimum=1
)
# Throttled sends are not charged as tries; after this many a delivery's throttles count as
# tries again, so that a provider that never stops throttling cannot keep one cycling forever.
EDSMART_MAX_THROTTLES = env_int("EDSMART_MAX_THROTTLES", default=50, minimum=1)

# --- Celery (see DESIGN.md "Celery settings that matter") ---------------------------------------
CELERY_BROKER_URL = REDIS_URL
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_SOFT_TIME_LIMIT = env_int("CELERY_TASK_SOFT_TIME_LIMIT", default=240, minimum=1)
CELERY_TASK_TIME_LIMIT = env_int("CELERY_TASK_TIME_LIMIT", default=300, minimum=1)
if EDSMART_BATCH_SECONDS + EDSMART_SUBMIT_LEASE_SECONDS >= CELERY_TASK_SOFT_TIME_LIMIT:
    raise ConfigError(
        "EDSMART_BATCH_SECONDS plus EDSMART_SUBMIT_LEASE_SECONDS must stay below "
        "CELERY_TASK_SOFT_TIME_LIMIT: a batch must end before its task is told to stop"
    )
# (A batch may also spend up to two minutes recording a reply while the database is away;
# past the soft time limit that reply is left as ``unknown``, never lost or resent.)
CELERY_VISIBILITY_TIMEOUT = env_int("CELERY_VISIBILITY_TIMEOUT", default=3600, minimum=60)
if CELERY_TASK_TIME_LIMIT * 2 > CELERY_VISIBILITY_TIMEOUT:
    raise ConfigError("CELERY_TASK_TIME_LIMIT must stay far below CELERY_VISIBILITY_TIMEOUT")
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": CELERY_VISIBILITY_TIMEOUT}
CELERY_TASK_DEFAULT_QUEUE = "periodic"
CELERY_TASK_ROUTES = {
    "notifications.tasks.send_batch": {"queue": "send"},
    "notifications.tasks.*": {"queue": "periodic"},
    "slips.tasks.*": {"queue": "periodic"},
}
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_WORKER_SEND_TASK_EVENTS = True
CELERY_TASK_SEND_SENT_EVENT = True
# Celery's Django fixup closes the DB connection after every task unless this is set.
CELERY_DB_REUSE_MAX = env_int("CELERY_DB_REUSE_MAX", default=1000, minimum=0)
CELERY_TIMEZONE = "UTC"
# Due messages are picked up within this much of their time (a small slip reaches its families
# within a few seconds of being due, even at peak).
EDSMART_DISPATCH_INTERVAL_SECONDS = env_float("EDSMART_DISPATCH_INTERVAL_SECONDS", 1.0, minimum=0.1)
EDSMART_SWEEP_INTERVAL_SECONDS = env_float("EDSMART_SWEEP_INTERVAL_SECONDS", 5.0, minimum=0.1)
# django-celery-beat's DatabaseScheduler copies these into its tables at start-up.
CELERY_BEAT_SCHEDULE = {
    "dispatch-due": {
        "task": "notifications.tasks.dispatch_due",
        "schedule": EDSMART_DISPATCH_INTERVAL_SECONDS,
        "options": {"expires": EDSMART_DISPATCH_INTERVAL_SECONDS * 5},
    },
    "sweep": {
        "task": "notifications.tasks.sweep",
        "schedule": EDSMART_SWEEP_INTERVAL_SECONDS,
        "options": {"expires": EDSMART_SWEEP_INTERVAL_SECONDS * 5},
    },
}

# --- Ops -----------------------------------------------------------------------------------------
SENTRY_DSN = env_str("SENTRY_DSN", default="")
FLOWER_BASIC_AUTH = env_str("FLOWER_BASIC_AUTH", default="")
EDSMART_OPS_EMAILS = env_list("EDSMART_OPS_EMAILS", default=[])
# Alerts about the mail provider should not depend on it: "" means EMAIL_BACKEND.
EDSMART_ALERT_EMAIL_BACKEND = env_str("EDSMART_ALERT_EMAIL_BACKEND", default="")
EDSMART_ALERT_BACKLOG_SECONDS = env_float("EDSMART_ALERT_BACKLOG_SECONDS", 900.0, minimum=1)
EDSMART_ALERT_FAILURE_RATE = env_float("EDSMART_ALERT_FAILURE_RATE", 0.2, minimum=0)
EDSMART_ALERT_FAILURE_WINDOW_SECONDS = env_float(
    "EDSMART_ALERT_FAILURE_WINDOW_SECONDS", 900.0, minimum=1
)
EDSMART_ALERT_FAILURE_MIN_COUNT = env_int("EDSMART_ALERT_FAILURE_MIN_COUNT", 10, minimum=1)
EDSMART_BEAT_MAX_AGE_SECONDS = env_float("EDSMART_BEAT_MAX_AGE_SECONDS", 120.0, minimum=15)
EDSMART_WORKER_MAX_AGE_SECONDS = env_float("EDSMART_WORKER_MAX_AGE_SECONDS", 180.0, minimum=15)
# Empty: /metrics answers 404.
EDSMART_METRICS_TOKEN = env_str("EDSMART_METRICS_TOKEN", default="")
EDSMART_METRICS_LATENCY_WINDOW_SECONDS = env_float(
    "EDSMART_METRICS_LATENCY_WINDOW_SECONDS", 3600.0, minimum=60
)
EDSMART_WATCH_INTERVAL_SECONDS = env_float("EDSMART_WATCH_INTERVAL_SECONDS", 60.0, minimum=1)
EDSMART_HEARTBEAT_INTERVAL_SECONDS = env_float(
    "EDSMART_HEARTBEAT_INTERVAL_SECONDS", 30.0, minimum=1
)
CELERY_BEAT_SCHEDULE["watch"] = {
    "task": "notifications.tasks.watch",
    "schedule": EDSMART_WATCH_INTERVAL_SECONDS,
    "options": {"expires": EDSMART_WATCH_INTERVAL_SECONDS},
}
# Deliveries and events of mailings closed longer ago than this are removed, their counts
# kept in the mailing's summary (notifications/retention.py); the task runs every hour.
EDSMART_DELIVERY_RETENTION_DAYS = env_int("EDSMART_DELIVERY_RETENTION_DAYS", 400, minimum=1)
CELERY_BEAT_SCHEDULE["history-prune"] = {
    "task": "notifications.tasks.history_prune",
    "schedule": 3600.0,
    "options": {"expires": 3600.0},
}
CELERY_BEAT_SCHEDULE["heartbeat"] = {
    "task": "notifications.tasks.heartbeat",
    "schedule": EDSMART_HEARTBEAT_INTERVAL_SECONDS,
    "options": {"expires": EDSMART_HEARTBEAT_INTERVAL_SECONDS},
}
ANYMAIL = {
    "MAILGUN_WEBHOOK_SIGNING_KEY": env_str("MAILGUN_WEBHOOK_SIGNING_KEY", default=""),
    # Basic auth for the webhooks, "user:password"; Mailgun's requires it when DEBUG is off,
    # Postmark's (unsigned) always: without it they answer 404 and log an error.
    "WEBHOOK_SECRET": env_str("ANYMAIL_WEBHOOK_SECRET", default=""),
}

LOG_JSON = env_bool("LOG_JSON", default=not DEBUG)
LOG_LEVEL = env_str("LOG_LEVEL", default="INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "json": {"()": "edsmart.json_logs.JsonLineFormatter"},
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    # Parents' link tokens never reach a log line (edsmart/log_redaction.py).
    "filters": {"parent_tokens": {"()": "edsmart.log_redaction.RedactParentTokens"}},
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json" if LOG_JSON else "plain",
            "filters": ["parent_tokens"],
        }
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {"django.db.backends": {"level": "INFO"}},
}

# --- Security (production defaults; `manage.py check --deploy` must be clean with DEBUG off) ---
# Set only when a reverse proxy that terminates TLS is in front and the web process cannot be
# reached around it (gunicorn bound to a private address or firewalled): then, and only then,
# its X-Forwarded-Proto says whether the request was HTTPS and its X-Forwarded-For who the
# client is. Without a proxy, anyone could send those headers and skip the HTTPS redirect.
EDSMART_BEHIND_PROXY = env_bool("EDSMART_BEHIND_PROXY", default=False)
if EDSMART_BEHIND_PROXY:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
if not DEBUG:
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", default=True)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", default=31536000, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$"]
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", default=[])


# --- Login guessing (django-axes) ----------------------------------------------------------------
def axes_client_ip(request: object) -> str | None:
    """The address a login attempt came from: the peer, or with ``EDSMART_BEHIND_PROXY`` the
    right-most X-Forwarded-For entry, the one the proxy itself appended (entries left of it are
    whatever the client sent)."""
    from django.conf import settings  # read per call: tests override it

    meta = request.META  # type: ignore[attr-defined]
    if settings.EDSMART_BEHIND_PROXY:
        forwarded = [a.strip() for a in meta.get("HTTP_X_FORWARDED_FOR", "").split(",")]
        if forwarded[-1]:
            return forwarded[-1]
    return meta.get("REMOTE_ADDR")


def axes_username(request: object, credentials: dict | None) -> str:
    """The username as the login form cleans it (stripped, NFKC-normalized), so that
    " admin" or "admin" in full-width letters count against the same account as "admin"."""
    raw = (credentials or {}).get("username")
    if raw is None:
        raw = request.POST.get("username", "")  # type: ignore[attr-defined]
    return unicodedata.normalize("NFKC", str(raw).strip())


# A username that fails AXES_FAILURE_LIMIT times in a row is locked, and so is an address that
# does: each on its own, so neither many passwords for one account nor many accounts from one
# address get far. A lock lifts AXES_COOLOFF_TIME after the failure that set it (failures while
# locked do not extend it); a successful login clears the account's and address's count. Ops
# unlock early with `manage.py axes_reset_username NAME`, `axes_reset_ip ADDRESS` or `axes_reset`.
AXES_FAILURE_LIMIT = env_int("EDSMART_LOGIN_FAILURE_LIMIT", default=5, minimum=1)
AXES_COOLOFF_TIME = dt.timedelta(
    minutes=env_int("EDSMART_LOGIN_COOLOFF_MINUTES", default=15, minimum=1)
)
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_RESET_ON_SUCCESS = True
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
AXES_LOCKOUT_TEMPLATE = "admin/locked_out.html"
AXES_CLIENT_IP_CALLABLE = "edsmart.settings.axes_client_ip"
AXES_USERNAME_CALLABLE = "edsmart.settings.axes_username"

if SENTRY_DSN:
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration
    from sentry_sdk.integrations.django import DjangoIntegration

    sentry_sdk.init(
        dsn=SENTRY_DSN,
        integrations=[DjangoIntegration(), CeleryIntegration(monitor_beat_tasks=True)],
        send_default_pii=False,
        traces_sample_rate=env_float("SENTRY_TRACES_SAMPLE_RATE", default=0.0, minimum=0),
        environment=env_str("SENTRY_ENVIRONMENT", default="production"),
    )
