"""Settings fail loudly on bad configuration, and a production configuration passes Django's
deployment checks."""

from __future__ import annotations

import os
import secrets
import subprocess

import pytest

from edsmart.env import ConfigError, database_from_url, env_bool, env_float, env_int, env_str
from tests.processes import run_python


def _clean_env(**overrides: str) -> dict[str, str]:
    """The current environment minus everything settings reads, plus overrides: a subprocess
    then sees exactly the configuration the test describes."""
    read_by_settings = {
        "DEBUG",
        "SECRET_KEY",
        "ALLOWED_HOSTS",
        "SENTRY_DSN",
        "CSRF_TRUSTED_ORIGINS",
        "SECURE_SSL_REDIRECT",
        "SECURE_HSTS_SECONDS",
        "EDSMART_BEHIND_PROXY",
    }
    env = {k: v for k, v in os.environ.items() if k not in read_by_settings}
    env.update(overrides)
    return env


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_python("-c", code, env=env, timeout=60)


@pytest.mark.parametrize("raw", ["maybe", "2", "tru", "enabled"])
def test_env_bool_rejects_anything_but_a_boolean(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("EDSMART_TEST_FLAG", raw)
    with pytest.raises(ConfigError, match="EDSMART_TEST_FLAG"):
        env_bool("EDSMART_TEST_FLAG")


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("off", False), (" Yes ", True)])
def test_env_bool_accepts_the_usual_spellings(
    monkeypatch: pytest.MonkeyPatch, raw: str, expected: bool
) -> None:
    monkeypatch.setenv("EDSMART_TEST_FLAG", raw)
    assert env_bool("EDSMART_TEST_FLAG") is expected


@pytest.mark.parametrize("raw", ["ten", "1.5", "0x10", "12abc"])
def test_env_int_rejects_non_integers(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("EDSMART_TEST_INT", raw)
    with pytest.raises(ConfigError, match="EDSMART_TEST_INT must be an integer"):
        env_int("EDSMART_TEST_INT", default=1)


def test_env_int_enforces_the_minimum(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDSMART_TEST_INT", "0")
    with pytest.raises(ConfigError, match="at least 1"):
        env_int("EDSMART_TEST_INT", default=5, minimum=1)


def test_env_float_rejects_non_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDSMART_TEST_FLOAT", "soon")
    with pytest.raises(ConfigError, match="EDSMART_TEST_FLOAT must be a number"):
        env_float("EDSMART_TEST_FLOAT", default=1.0)


def test_env_str_without_default_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDSMART_TEST_REQUIRED", raising=False)
    with pytest.raises(ConfigError, match="EDSMART_TEST_REQUIRED must be set"):
        env_str("EDSMART_TEST_REQUIRED")


@pytest.mark.parametrize(
    "url", ["sqlite:///db.sqlite3", "sqlite://:memory:", "mysql://root@localhost/edsmart"]
)
def test_database_url_must_be_postgres(url: str) -> None:
    with pytest.raises(ConfigError, match="PostgreSQL is required"):
        database_from_url(url)


def test_database_url_must_name_a_database() -> None:
    with pytest.raises(ConfigError, match="must name a database"):
        database_from_url("postgres://postgres@127.0.0.1:5432/")


def test_database_url_reads_every_part() -> None:
    db = database_from_url(
        "postgresql://ed%40smart:p%2Fss@db.internal:6543/edsmart?sslmode=require"
    )
    assert db["ENGINE"] == "django.db.backends.postgresql"
    assert (db["USER"], db["PASSWORD"], db["HOST"], db["PORT"], db["NAME"]) == (
        "ed@smart",
        "p/ss",
        "db.internal",
        "6543",
        "edsmart",
    )
    assert db["OPTIONS"] == {"sslmode": "require"}


def test_database_url_with_a_unix_socket() -> None:
    """The embedded PostgreSQL of the dev stack listens on a socket only."""
    db = database_from_url("postgresql://postgres:@/edsmart?host=/tmp/pgdata")
    assert (db["HOST"], db["NAME"], db["OPTIONS"]) == ("/tmp/pgdata", "edsmart", {})


def test_settings_refuse_to_start_without_secret_key_when_debug_is_off() -> None:
    result = _python("import edsmart.settings", _clean_env(DEBUG="0"))
    assert result.returncode != 0
    assert "SECRET_KEY must be set when DEBUG is off" in result.stderr


def test_settings_refuse_to_start_without_allowed_hosts_when_debug_is_off() -> None:
    env = _clean_env(DEBUG="0", SECRET_KEY=secrets.token_urlsafe(50))
    result = _python("import edsmart.settings", env)
    assert result.returncode != 0
    assert "ALLOWED_HOSTS must be set when DEBUG is off" in result.stderr


def test_settings_use_a_development_key_only_with_debug_on() -> None:
    result = _python(
        "import edsmart.settings as s; print(s.DEBUG, bool(s.SECRET_KEY))", _clean_env(DEBUG="1")
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True True"


def test_settings_refuse_a_malformed_debug_flag() -> None:
    result = _python("import edsmart.settings", _clean_env(DEBUG="maybe", SECRET_KEY="x" * 60))
    assert result.returncode != 0
    assert "DEBUG must be a boolean" in result.stderr


@pytest.mark.parametrize(
    "name, value",
    [
        ("EDSMART_UNKNOWN_POLICY", "resend"),
        ("EDSMART_IDEMPOTENT_BACKENDS", "anymail.backends.postmark.EmailBackend"),
        ("EDSMART_IDEMPOTENCY_WINDOW_SECONDS", "86400"),
    ],
)
def test_the_removed_resend_policy_is_refused_rather_than_ignored(name: str, value: str) -> None:
    """No backend sends an idempotency key, so automatic resending could only duplicate: a
    deployment still asking for it stops at start-up and says why, instead of running
    without what it asked for."""
    result = _python("import edsmart.settings", _clean_env(DEBUG="1", **{name: value}))
    assert result.returncode != 0
    assert name in result.stderr and "idempotency key" in result.stderr


@pytest.mark.parametrize(
    "env, fine",
    [({}, True), ({"EDSMART_BATCH_SECONDS": "235"}, False)],
    ids=["defaults", "batch-outlasts-its-task"],
)
def test_a_batch_must_end_before_its_task_is_told_to_stop(env: dict, fine: bool) -> None:
    result = _python("import edsmart.settings", _clean_env(DEBUG="1", **env))
    assert (result.returncode == 0) is fine, result.stderr
    if not fine:
        assert "EDSMART_BATCH_SECONDS" in result.stderr


def test_check_deploy_is_clean_with_debug_off() -> None:
    """A production-shaped environment (DEBUG off, a long random key, the site's host name)
    passes every deployment check, so `check --deploy` can gate a release."""
    env = _clean_env(
        DEBUG="0",
        SECRET_KEY=secrets.token_urlsafe(64),
        ALLOWED_HOSTS="edsmart.example.org",
    )
    result = run_python(
        "manage.py", "check", "--deploy", "--fail-level", "WARNING", env=env, timeout=120
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNINGS" not in output
    assert "no issues" in output


def test_prepare_threshold_from_a_url_query_becomes_a_number() -> None:
    env = _clean_env(
        DEBUG="1",
        DATABASE_URL="postgres://postgres@127.0.0.1:5432/edsmart?prepare_threshold=7",
    )
    code = "import edsmart.settings as s; print(repr(s.DATABASES['default']['OPTIONS']))"
    result = _python(code, env)
    assert result.returncode == 0, result.stderr
    assert "'prepare_threshold': 7" in result.stdout
    env["DB_PREPARED_STATEMENTS"] = "0"
    result = _python(code, env)
    # None, not absent: absent, psycopg's own default (5) would prepare behind a pooler.
    assert "'prepare_threshold': None" in result.stdout, result.stdout


# --- the proxy header (issue 13) -----------------------------------------------------------------

_PROBE = """
import django
django.setup()
from django.conf import settings
from django.test import Client

response = Client().get(
    "/no-such-page", HTTP_HOST="edsmart.example.org", HTTP_X_FORWARDED_PROTO="https"
)
print(getattr(settings, "SECURE_PROXY_SSL_HEADER", None))
print(response.status_code, response.get("Location", ""))
"""


def _production_env(**overrides: str) -> dict[str, str]:
    return _clean_env(
        DEBUG="0",
        SECRET_KEY=secrets.token_urlsafe(64),
        ALLOWED_HOSTS="edsmart.example.org",
        DJANGO_SETTINGS_MODULE="edsmart.settings",
        **overrides,
    )


def test_a_forwarded_proto_header_does_not_skip_the_https_redirect_without_a_proxy() -> None:
    """gunicorn binds 0.0.0.0: anyone reaching it straight could claim HTTPS with the header."""
    result = _python(_PROBE, _production_env())
    assert result.returncode == 0, result.stderr
    header, answer = result.stdout.splitlines()[-2:]
    assert header == "None"
    assert answer == "301 https://edsmart.example.org/no-such-page"


@pytest.mark.parametrize("flag", ["1", "yes"])
def test_the_proxy_header_is_trusted_when_a_proxy_is_declared(flag: str) -> None:
    result = _python(_PROBE, _production_env(EDSMART_BEHIND_PROXY=flag))
    assert result.returncode == 0, result.stderr
    header, answer = result.stdout.splitlines()[-2:]
    assert header == "('HTTP_X_FORWARDED_PROTO', 'https')"
    assert answer.startswith("404")  # taken as HTTPS: no redirect, the page is simply not there


def test_behind_proxy_must_be_a_boolean() -> None:
    result = _python("import edsmart.settings", _production_env(EDSMART_BEHIND_PROXY="nginx"))
    assert result.returncode != 0
    assert "EDSMART_BEHIND_PROXY must be a boolean" in result.stderr


def test_check_deploy_is_clean_behind_a_proxy_too() -> None:
    result = run_python(
        "manage.py",
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        env=_production_env(EDSMART_BEHIND_PROXY="1"),
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNINGS" not in output
    assert "no issues" in output
