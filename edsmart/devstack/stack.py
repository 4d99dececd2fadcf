"""``run``: migrate, load the demo school, then start the Procfile's roles plus the mail catcher
with honcho, print a banner once everything answers, and stop everything started on Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from edsmart.devstack.common import (
    LOCALHOST,
    ROOT,
    STATE_DIR,
    log,
    mask_url,
    port_open,
    port_or_free,
)
from edsmart.devstack.services import (
    Services,
    base_env,
    resolve_services,
    sigterm_as_interrupt,
)

if TYPE_CHECKING:
    from honcho.manager import Manager
    from honcho.printer import Message

PROCFILE = ROOT / "Procfile"
PROCFILE_ROLES = ("web", "worker", "beat", "flower")
# Dev data lives in Redis db 0; the test suite empties its db, so it gets another one.
RUN_REDIS_DB = 0
READY_TIMEOUT = 90.0


def read_procfile(path: Path = PROCFILE) -> dict[str, str]:
    """The Procfile's roles, the single source of the commands the stack runs."""
    from honcho.environ import parse_procfile

    processes = dict(parse_procfile(path.read_text()).processes)
    missing = [role for role in PROCFILE_ROLES if role not in processes]
    if missing:
        raise RuntimeError(f"{path} lacks the roles {missing}")
    return processes


def _manage(args: Sequence[str], env: Mapping[str, str], *, capture: bool = False) -> str:
    cmd = [sys.executable, str(ROOT / "manage.py"), *args]
    result = subprocess.run(
        cmd, env=dict(env), cwd=ROOT, text=True, capture_output=capture, check=False
    )
    if capture and result.stdout:
        sys.stdout.write(result.stdout)
    if capture and result.stderr:
        sys.stderr.write(result.stderr)
    if result.returncode != 0:
        raise RuntimeError(
            f"`manage.py {' '.join(args)}` failed with exit code {result.returncode}"
        )
    return result.stdout or ""


# --- run -----------------------------------------------------------------------------------------


def _make_printer(worker_ready: threading.Event) -> object:
    """honcho's printer, also watching for the worker's own "ready." line: the only sign that
    it really consumes from the broker."""
    from honcho.printer import Printer

    class _Printer(Printer):
        def write(self, message: Message) -> None:
            if message.name == "worker" and message.type == "line":
                data = message.data
                text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
                if " ready." in text:
                    worker_ready.set()
            super().write(message)

    return _Printer(sys.stdout)


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - our own URL
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _wait_ready(
    *,
    worker_ready: threading.Event,
    web_url: str,
    mail_url: str,
    flower_port: int,
    banner: str,
    manager: Manager,
    started: float,
) -> None:
    from honcho.printer import Message

    def say(text: str) -> None:
        manager.events.put(
            Message(type="line", data=text, time=datetime.now(), name="devstack", colour=None)
        )

    deadline = time.monotonic() + READY_TIMEOUT
    checks: dict[str, Callable[[], bool]] = {
        "web": lambda: _http_ok(web_url + "admin/login/"),
        "mail catcher": lambda: _http_ok(mail_url),
        "flower": lambda: port_open(flower_port),
        "worker": worker_ready.is_set,
    }
    pending = dict(checks)
    while pending and time.monotonic() < deadline:
        for name, check in list(pending.items()):
            if check():
                del pending[name]
        if pending:
            time.sleep(0.25)
    if pending:
        say(f"still waiting for {', '.join(pending)} after {READY_TIMEOUT:.0f}s; see the log above")
        return
    say(banner.format(seconds=time.monotonic() - started))


def cmd_run() -> int:
    """Migrate, seed, start every role and the mail catcher; Ctrl-C stops all of it."""
    from honcho.manager import Manager

    started = time.monotonic()
    services: Services | None = None
    try:
        with sigterm_as_interrupt():
            procfile = read_procfile()
            services = resolve_services(redis_db=RUN_REDIS_DB)
            env = base_env(services)
            env.setdefault("DEBUG", "1")
            web_port = port_or_free(int(env.get("PORT") or 8000))
            smtp_port = port_or_free(1025)
            mail_port = port_or_free(8025)
            flower_port = port_or_free(int(env.get("FLOWER_PORT") or 5555))
            flower_auth = env.get("FLOWER_BASIC_AUTH") or f"dev:{secrets.token_urlsafe(12)}"
            site_url = f"http://{LOCALHOST}:{web_port}"
            env.update(
                {
                    "PORT": str(web_port),
                    "WEB_HOST": LOCALHOST,
                    "SITE_URL": site_url,
                    "EMAIL_HOST": LOCALHOST,
                    "EMAIL_PORT": str(smtp_port),
                    "FLOWER_PORT": str(flower_port),
                    "FLOWER_ADDRESS": LOCALHOST,
                    "FLOWER_BASIC_AUTH": flower_auth,
                }
            )
            debug = env["DEBUG"].strip().lower() in {"1", "true", "yes", "on"}
            if debug:
                # Reload on code changes; whitenoise serves static files from the apps while
                # DEBUG is on (WHITENOISE_USE_FINDERS defaults to DEBUG), so no collectstatic.
                env.setdefault("GUNICORN_CMD_ARGS", "--reload")

            log("migrating")
            _manage(["migrate", "--noinput"], env)
            if not debug:
                _manage(["collectstatic", "--noinput", "-v", "0"], env)
            log("loading the demo school (seed_demo)")
            # seed_demo refuses with DEBUG off unless told: the dev stack is where it belongs.
            seed_args = ["seed_demo"] if debug else ["seed_demo", "--force"]
            seed_output = _manage(seed_args, env, capture=True)

        worker_ready = threading.Event()
        manager = Manager(printer=_make_printer(worker_ready))
        for role in PROCFILE_ROLES:
            manager.add_process(role, procfile[role], env=env, cwd=str(ROOT))
        mail_cmd = "exec " + shlex.join(
            [
                sys.executable,
                "-m",
                "edsmart.devstack.mailcatcher",
                "--smtp-port",
                str(smtp_port),
                "--http-port",
                str(mail_port),
                "--dir",
                str(STATE_DIR / "mail"),
            ]
        )
        manager.add_process("mail", mail_cmd, env=env, cwd=str(ROOT))

        seed_lines = "\n".join(f"    {line}" for line in seed_output.strip().splitlines())
        banner = "\n".join(
            [
                "=" * 72,
                "EdSmart is ready (in {seconds:.1f}s)",
                f"  Staff admin:        {site_url}/admin/",
                "  Demo login (from seed_demo):",
                _escape_braces(seed_lines) or "    (seed_demo printed nothing)",
                f"  Mail parents get:   http://{LOCALHOST}:{mail_port}/",
                f"  Flower:             http://{LOCALHOST}:{flower_port}/  "
                f"(basic auth {flower_auth})",
                f"  PostgreSQL:         {mask_url(services.database_url)} "
                f"({services.database_source})",
                f"  Redis:              {services.redis_url} ({services.redis_source})",
                "  Press Ctrl-C to stop everything.",
                "=" * 72,
            ]
        )
        threading.Thread(
            target=_wait_ready,
            kwargs={
                "worker_ready": worker_ready,
                "web_url": f"{site_url}/",
                "mail_url": f"http://{LOCALHOST}:{mail_port}/",
                "flower_port": flower_port,
                "banner": banner,
                "manager": manager,
                "started": started,
            },
            daemon=True,
        ).start()
        # honcho installs its own SIGINT/SIGTERM handlers: it SIGTERMs every role's process
        # group, waits, then SIGKILLs stragglers; if one role dies, it stops the others.
        manager.loop()
        _wait_for_groups([p["pid"] for p in manager._processes.values() if p.get("pid")])
        rc = manager.returncode or 0
        return 0 if rc in (130, 143) else rc
    except KeyboardInterrupt:
        return 130
    except RuntimeError as exc:
        log(f"error: {exc}")
        return 1
    finally:
        if services is not None:
            log("stopping embedded services" if services._stoppers else "stopped")
            services.close()


def _wait_for_groups(pgids: Sequence[int], timeout: float = 20.0) -> None:
    """Wait until every process of the roles has exited, then kill stragglers.

    honcho's loop returns once each role's shell has exited, but the shell does not always
    ``exec`` its program, so gunicorn or a Celery worker can still be shutting down under it.
    Embedded servers must outlive them, and nothing may be left behind.
    """
    groups = set(pgids)
    deadline = time.monotonic() + timeout
    while True:
        alive = group_members(groups)
        if not alive:
            return
        if time.monotonic() > deadline:
            log(f"killing processes that ignored SIGTERM: {sorted(alive)}")
            for pgid in groups:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
            return
        time.sleep(0.1)


def group_members(pgids: set[int]) -> list[int]:
    """Live (not zombie) processes in these process groups."""
    import psutil

    members = []
    for proc in psutil.process_iter(["pid", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if os.getpgid(proc.info["pid"]) in pgids:
                members.append(proc.info["pid"])
        except (ProcessLookupError, PermissionError):
            continue
    return members


def _escape_braces(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")
