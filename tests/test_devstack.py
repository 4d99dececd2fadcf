"""The dev stack finds services in the documented order, starts real embedded servers when it
has to, and stops what it started; the mail catcher shows caught mail safely.

Over 400 lines on purpose: the two README commands and their services are one unit.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest
import redis
from django.conf import settings
from django.core import mail as django_mail

from edsmart.devstack import cli
from edsmart.devstack.common import free_port, mask_url, port_open
from edsmart.devstack.mailcatcher import MailCatcher, linkify
from edsmart.devstack.pytest_workers import BASE_VARIABLE, worker_redis_url
from edsmart.devstack.services import ensure_database, resolve_services
from edsmart.devstack.stack import PROCFILE_ROLES, group_members, read_procfile
from tests.processes import run_python

ROOT = Path(__file__).resolve().parent.parent
NO_TESTS_ARGS = ["-q", "-p", "no:cacheprovider", "-k", "no_test_has_this_name", __file__]


def closed_port() -> int:
    """A port nothing listens on (bound and released, so nobody else holds it right now)."""
    return free_port()


@contextlib.contextmanager
def rude_listener() -> Iterator[int]:
    """Something on a port that accepts connections and hangs up: neither PostgreSQL nor Redis."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = server.accept()
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        server.close()


def _http(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - local test URLs
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


# --- resolution ----------------------------------------------------------------------------------


def test_port_open_sees_a_listener_and_its_absence() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert port_open(port)
    assert not port_open(port)


def test_urls_from_the_environment_win_and_nothing_is_started(tmp_path: Path) -> None:
    environ = {"DATABASE_URL": "postgres://u:pw@db.example/edsmart", "REDIS_URL": "redis://r/3"}
    with resolve_services(
        redis_db=0,
        environ=environ,
        pg_port=closed_port(),
        redis_port=closed_port(),
        state_dir=tmp_path,
    ) as services:
        assert (services.database_url, services.database_source) == (environ["DATABASE_URL"], "env")
        assert (services.redis_url, services.redis_source) == ("redis://r/3", "env")
    assert list(tmp_path.iterdir()) == []


def _local_test_servers() -> tuple[int, int]:
    """The ports of the servers this test run uses, when they are plain local ones; the
    "already listening" branch can only be shown against a real local server."""
    db = settings.DATABASES["default"]
    if db["HOST"] not in {"127.0.0.1", "localhost"} or db["PASSWORD"] or db["USER"] != "postgres":
        pytest.skip("the test database is not a trust-auth PostgreSQL on 127.0.0.1")
    redis_url = redis.Redis.from_url(settings.REDIS_URL).connection_pool.connection_kwargs
    if redis_url.get("host") not in {"127.0.0.1", "localhost"}:
        pytest.skip("the test Redis is not on 127.0.0.1")
    return int(db["PORT"] or 5432), int(redis_url.get("port", 6379))


def test_servers_already_listening_are_used_and_the_database_is_created(tmp_path: Path) -> None:
    pg_port, redis_port = _local_test_servers()
    name = f"edsmart_probe_{uuid.uuid4().hex[:10]}"
    try:
        with resolve_services(
            redis_db=7,
            environ={},
            pg_port=pg_port,
            redis_port=redis_port,
            state_dir=tmp_path,
            database=name,
        ) as services:
            assert services.database_source == "local"
            assert services.database_url == f"postgres://postgres@127.0.0.1:{pg_port}/{name}"
            assert services.redis_source == "local"
            assert services.redis_url == f"redis://127.0.0.1:{redis_port}/7"
            with psycopg.connect(services.database_url) as conn:
                assert conn.execute("SELECT current_database()").fetchone() == (name,)
            # Creating is idempotent: a second resolution finds the database.
            assert ensure_database(services.database_url) is False
    finally:
        with psycopg.connect(
            f"postgres://postgres@127.0.0.1:{pg_port}/postgres", autocommit=True
        ) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
    assert list(tmp_path.iterdir()) == []


def test_something_else_on_the_redis_port_is_an_error_not_a_silent_fallback(
    tmp_path: Path,
) -> None:
    with rude_listener() as port, pytest.raises(RuntimeError, match="does not answer a Redis PING"):
        resolve_services(
            redis_db=0,
            environ={"DATABASE_URL": "postgres://x/y"},
            redis_port=port,
            state_dir=tmp_path,
        )


def test_something_else_on_the_postgres_port_is_an_error(tmp_path: Path) -> None:
    with rude_listener() as port, pytest.raises(RuntimeError, match="Set DATABASE_URL"):
        resolve_services(
            redis_db=0, environ={"REDIS_URL": "redis://x/0"}, pg_port=port, state_dir=tmp_path
        )


def test_no_redis_listening_starts_a_real_embedded_redis_on_tcp(tmp_path: Path) -> None:
    started = time.monotonic()
    services = resolve_services(
        redis_db=2,
        environ={"DATABASE_URL": "postgres://x/y"},
        redis_port=closed_port(),
        state_dir=tmp_path,
    )
    try:
        assert services.redis_source == "embedded"
        assert time.monotonic() - started < 10
        client = redis.Redis.from_url(services.redis_url)
        client.set("k", "v")
        assert client.get("k") == b"v"
        assert client.info("server")["redis_version"].startswith("6.")
        assert client.connection_pool.connection_kwargs["db"] == 2
        client.close()
        port = client.connection_pool.connection_kwargs["port"]
    finally:
        services.close()
    assert not port_open(port)


def test_no_postgres_listening_starts_a_real_embedded_postgres(tmp_path: Path) -> None:
    started = time.monotonic()
    services = resolve_services(
        redis_db=0,
        environ={"REDIS_URL": "redis://x/0"},
        pg_port=closed_port(),
        state_dir=tmp_path,
    )
    try:
        assert services.database_source == "embedded"
        assert time.monotonic() - started < 30
        with psycopg.connect(services.database_url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("edsmart",)
            version = conn.execute("SHOW server_version_num").fetchone()[0]
            assert int(version) >= 160000
        # The URL is one Django's settings accept (a unix socket in the data directory).
        assert "host=" in services.database_url
    finally:
        services.close()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(services.database_url, connect_timeout=2)


def test_mask_url_hides_passwords() -> None:
    assert mask_url("postgres://u:secret@h/db") == "postgres://u:***@h/db"
    assert mask_url("redis://h:6379/0") == "redis://h:6379/0"


# --- Procfile ------------------------------------------------------------------------------------


def test_procfile_has_exactly_the_four_roles() -> None:
    assert tuple(read_procfile()) == PROCFILE_ROLES


def test_flower_refuses_to_start_without_basic_auth() -> None:
    command = read_procfile()["flower"]
    env = {**os.environ, "FLOWER_BASIC_AUTH": ""}
    result = subprocess.run(
        ["/bin/sh", "-c", command], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode != 0
    assert "FLOWER_BASIC_AUTH" in result.stderr


def test_test_command_counts_no_tests_as_a_failure() -> None:
    """Also proves ``python -m edsmart.devstack`` starts despite edsmart/__init__ importing the
    Celery app."""
    env = {
        **os.environ,
        "DATABASE_URL": os.environ.get("DATABASE_URL", ""),
        "REDIS_URL": settings.REDIS_URL,
    }
    env = {k: v for k, v in env.items() if v}
    result = run_python("-m", "edsmart.devstack", "test", *NO_TESTS_ARGS, env=env, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "collected no tests" in result.stderr


def test_unknown_command_prints_usage() -> None:
    assert cli.main(["nonsense"]) == 2
    assert cli.main(["run", "--extra"]) == 2


# --- mail catcher --------------------------------------------------------------------------------


@pytest.fixture
def catcher(tmp_path: Path) -> Iterator[MailCatcher]:
    with MailCatcher(tmp_path / "mail", smtp_port=free_port(), http_port=free_port()) as running:
        yield running


def _send(catcher: MailCatcher, subject: str, text: str, html: str | None = None) -> None:
    connection = django_mail.get_connection(
        "django.core.mail.backends.smtp.EmailBackend",
        host="127.0.0.1",
        port=catcher.smtp_port,
        use_tls=False,
        timeout=5,
    )
    message = django_mail.EmailMultiAlternatives(
        subject=subject,
        body=text,
        from_email="Northside Primary <office@northside.example>",
        to=["parent@example.com"],
        bcc=["copy@example.com"],
        connection=connection,
    )
    if html is not None:
        message.attach_alternative(html, "text/html")
    assert message.send() == 1


def test_catcher_lists_newest_first_and_escapes_what_it_shows(catcher: MailCatcher) -> None:
    _send(catcher, "First <b>bold</b>", "one")
    time.sleep(0.01)
    _send(catcher, 'Second <script>alert("x")</script>', "two")

    status, headers, body = _http(catcher.http_url)
    assert status == 200
    assert "<script>" not in body
    assert "&lt;script&gt;" in body
    assert body.index("Second") < body.index("First")
    assert "default-src 'none'" in headers["Content-Security-Policy"]

    status, _, listing = _http(catcher.http_url + "api/messages")
    messages = json.loads(listing)
    assert [m["subject"] for m in messages] == [
        'Second <script>alert("x")</script>',
        "First <b>bold</b>",
    ]
    assert messages[0]["envelope_to"] == ["parent@example.com", "copy@example.com"]


def test_catcher_shows_text_with_clickable_links_and_html_sandboxed(catcher: MailCatcher) -> None:
    link = "http://127.0.0.1:8000/p/abc.def?x=1&y=2"
    _send(
        catcher,
        "Excursion to the zoo",
        f"Please answer here: {link}.\nThanks <Ms Jones>",
        html=f'<p>Answer <a href="{link}">here</a></p><script>alert(1)</script>',
    )
    [message] = json.loads(_http(catcher.http_url + "api/messages")[2])
    page_url = f"{catcher.http_url}messages/{message['id']}"

    status, _, page = _http(page_url)
    assert status == 200
    escaped_link = "http://127.0.0.1:8000/p/abc.def?x=1&amp;y=2"
    assert f'<a href="{escaped_link}" target="_blank"' in page
    assert "Thanks &lt;Ms Jones&gt;" in page
    assert re.search(r'<iframe sandbox="allow-popups allow-popups-to-escape-sandbox" src=', page)
    assert "allow-scripts" not in page and "allow-same-origin" not in page

    status, headers, html_part = _http(page_url + "/html")
    assert status == 200
    assert headers["Content-Security-Policy"].startswith("sandbox ")
    assert html_part.startswith('<base target="_blank">')

    status, _, raw = _http(page_url + "/raw")
    assert status == 200 and "Subject: Excursion to the zoo" in raw


@pytest.mark.parametrize(
    "path",
    ["messages/..%2F..%2Fetc%2Fpasswd", "messages/../../etc/passwd", "nope", "messages/x.eml"],
)
def test_catcher_serves_only_its_own_files(catcher: MailCatcher, path: str) -> None:
    assert _http(catcher.http_url + path)[0] == 404


def test_linkify_only_links_http_urls() -> None:
    assert linkify("javascript:alert(1)") == "javascript:alert(1)"
    assert linkify('"https://a.example/x"') == (
        '&quot;<a href="https://a.example/x" target="_blank" rel="noopener noreferrer">'
        "https://a.example/x</a>&quot;"
    )


# --- the whole stack -----------------------------------------------------------------------------


def _reader(stream, lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)
    lines.put("")


def _url_for_new_database(name: str) -> str:
    """A URL for another database on the server the test database lives on (TCP or socket)."""
    db = settings.DATABASES["default"]
    auth = f"{quote(db['USER'] or '')}:{quote(db['PASSWORD'] or '')}@"
    if str(db["HOST"]).startswith("/"):
        return f"postgresql://{auth}/{name}?host={db['HOST']}"
    return f"postgresql://{auth}{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{name}"


def _drop_database(url: str) -> None:
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    maintenance = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(maintenance, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.workers
def test_run_starts_every_role_and_ctrl_c_stops_them_all(tmp_path: Path) -> None:
    """README command 1 on the test servers, in its own database: everything answers, then one
    SIGINT (what Ctrl-C sends) leaves no process of the stack behind."""
    database_url = _url_for_new_database(f"edsmart_run_{uuid.uuid4().hex[:10]}")
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": settings.REDIS_URL,
        "PORT": str(free_port()),
        "FLOWER_PORT": str(free_port()),
        "FLOWER_BASIC_AUTH": "ops:test-password",
    }
    env.pop("DEBUG", None)
    ensure_database(database_url)
    process = subprocess.Popen(
        [sys.executable, "-m", "edsmart.devstack", "run"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_reader, args=(process.stdout, lines), daemon=True).start()
    output: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            output.append(line)
            if not line or "Press Ctrl-C" in line:
                break
        text = "".join(output)
        assert "EdSmart is ready" in text, text[-5000:]
        pgids = [int(pid) for pid in re.findall(r"started \(pid=(\d+)\)", text)]
        assert len(pgids) == 5, text[-5000:]  # four Procfile roles and the mail catcher

        web = f"http://127.0.0.1:{env['PORT']}"
        assert _http(f"{web}/admin/login/")[0] == 200
        assert _http(f"{web}/static/admin/css/base.css")[0] == 200
        mail_url = re.search(r"Mail parents get:\s+(\S+)", text).group(1)
        assert _http(mail_url)[0] == 200
        flower = f"http://127.0.0.1:{env['FLOWER_PORT']}/"
        assert _http(flower)[0] == 401
        assert _http(flower, {"Authorization": "Basic b3BzOnRlc3QtcGFzc3dvcmQ="})[0] == 200

        os.kill(process.pid, signal.SIGINT)
        assert process.wait(timeout=30) == 0
        assert group_members(set(pgids)) == []
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        _drop_database(database_url)


# --- the suite in two processes ----------------------------------------------------------------


def test_each_test_process_gets_its_own_redis_db() -> None:
    assert worker_redis_url("redis://127.0.0.1:6379/9", "gw0") == "redis://127.0.0.1:6379/9"
    assert worker_redis_url("redis://127.0.0.1:6379/9", "gw1") == "redis://127.0.0.1:6379/10"
    assert worker_redis_url("redis://:pw@r:1/0", "gw3") == "redis://:pw@r:1/3"
    assert worker_redis_url("redis://r:1", "gw1") == "redis://r:1/1"
    with pytest.raises(RuntimeError, match="past Redis's 16"):
        worker_redis_url("redis://r:1/15", "gw1")


def test_this_process_uses_the_redis_db_of_its_worker() -> None:
    """Under xdist, the settings Django read already carry this worker's db (the plugin ran
    before them): on ``gw1`` a db other than the one the run was given."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        pytest.skip("the suite runs in one process (-n 0)")
    expected = worker_redis_url(os.environ[BASE_VARIABLE], worker)
    assert settings.REDIS_URL == os.environ["REDIS_URL"] == expected
