"""The developer's stack in one command: ``python -m edsmart.devstack run`` or ``... test``.

``run`` migrates, loads the demo school, then starts the Procfile's roles plus the mail catcher
and stops everything it started on Ctrl-C. ``test`` runs pytest with the same services and
returns its exit code. Both find PostgreSQL and Redis as described in ``services``.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import subprocess
import sys
from collections.abc import Sequence

from edsmart.devstack.common import ROOT, log
from edsmart.devstack.services import Services, base_env, resolve_services, sigterm_as_interrupt
from edsmart.devstack.stack import cmd_run

# The test suite empties its Redis db; dev data lives in db 0 (see stack.RUN_REDIS_DB).
TEST_REDIS_DB = 9


# --- test ----------------------------------------------------------------------------------------


def cmd_test(pytest_args: Sequence[str]) -> int:
    """Run pytest against the resolved services; "no tests collected" counts as a failure."""
    services: Services | None = None
    try:
        with sigterm_as_interrupt():
            services = resolve_services(redis_db=TEST_REDIS_DB)
        env = base_env(services)
        if not env.get("SECRET_KEY"):
            env["SECRET_KEY"] = secrets.token_urlsafe(50)
        process = subprocess.Popen(
            [sys.executable, "-m", "pytest", *pytest_args], env=env, cwd=ROOT
        )
        rc = _wait_forwarding_signals(process)
        if rc == 5:
            log("pytest collected no tests: treating that as a failure")
            return 1
        return rc
    except KeyboardInterrupt:
        return 130
    except RuntimeError as exc:
        log(f"error: {exc}")
        return 1
    finally:
        if services is not None:
            services.close()


def _wait_forwarding_signals(process: subprocess.Popen[bytes]) -> int:
    """Wait for pytest. A terminal Ctrl-C already reaches pytest (same process group) and it
    stops on its own, so we just keep waiting; a SIGTERM sent to us alone is passed on."""

    def _forward(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)

    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    previous_term = signal.signal(signal.SIGTERM, _forward)
    try:
        return process.wait()
    finally:
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term)


# --- CLI -----------------------------------------------------------------------------------------

USAGE = """usage: python -m edsmart.devstack run
       python -m edsmart.devstack test [pytest arguments...]

run   migrate, load the demo school, start web, worker, beat, flower and a mail catcher
test  run the test suite (arguments go to pytest)

Services: DATABASE_URL/REDIS_URL when set, else PostgreSQL and Redis on 127.0.0.1:5432/6379,
else embedded servers from the dev extra (data in .devstack/)."""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "run":
        if rest:
            print(USAGE, file=sys.stderr)
            return 2
        return cmd_run()
    if command == "test":
        return cmd_test(rest)
    print(USAGE, file=sys.stderr)
    return 2
