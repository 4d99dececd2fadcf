"""A roster uploaded in the admin: preview it, confirm it, import it (in a task when large).

What the admin and ``slips.tasks`` call; the reading, planning and writing are
``slips.roster``'s, the same as the ``import_roster`` command's. The states and why there is no
"running" row are drawn on ``RosterImport``.

Progress of a running import lives in Redis (``progress_key``), written by the importing
process every few hundred people: the import is one transaction, so no other session can count
its rows in PostgreSQL until it commits. Redis is only a helper here: without it the page says
"importing" without a count, and the row's status is the truth either way.
"""

from __future__ import annotations

import hashlib
import io
import logging
from contextlib import suppress

import redis
from celery import current_app
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from edsmart.redis_client import redis_client
from slips.models import RosterImport
from slips.roster import (
    RosterChangedError,
    RosterError,
    RosterPreview,
    RowError,
    roster_import,
    roster_preview,
)

log = logging.getLogger("edsmart.roster")

S = RosterImport.Status
TASK_NAME = "slips.tasks.roster_import_run"
# Rows of each table kept in a preview (the counts are always complete).
PREVIEW_LIMIT = 500
# Errors kept: enough to fix a file from, without a 50,000-line page for a wrong file.
ERROR_LIMIT = 2000
PROGRESS_TTL_SECONDS = 24 * 3600
CHANGED = (
    "The school's students or guardians changed since the preview, so nothing was imported. "
    "This is the file's preview now: check it and confirm again."
)
ERRORS_NOW = (
    "The file has errors now (a group may have been renamed or removed since the preview), "
    "so nothing was imported."
)


def sha256_of(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def roster_import_preview(*, roster_import_row: RosterImport, text: str) -> RosterImport:
    """Fills in and saves a new upload (school, uploader, filename set): its preview, or its
    errors line by line. Nothing of the school is written."""
    row = roster_import_row
    preview = roster_preview(school=row.school, file=_file(text))
    row.csv_text = text
    row.sha256 = sha256_of(text)
    row.rows = preview.rows
    _apply_preview(row, preview)
    if row.status == S.INVALID:
        row.csv_text = ""  # nothing can be confirmed; the errors are what staff need
    row.save()
    return row


def roster_import_confirm(
    *, roster_import_row: RosterImport, requeue: bool = False
) -> RosterImport:
    """Confirms a previewed upload: imports it now if small, else queues the task.

    The move ``previewed -> queued`` is one conditional UPDATE, so a double click (or two
    staff at once) confirms once. With ``requeue``, an import still queued gets its task
    queued again: how a lost task message, or an inline import whose web process died, is
    recovered. That is safe: the task waits for a running import's lock, then finds it done.
    """
    row = roster_import_row
    confirmed = RosterImport.objects.filter(pk=row.pk, status=S.PREVIEWED).update(
        status=S.QUEUED, confirmed_at=timezone.now(), progress_done=0
    )
    row.refresh_from_db()
    if confirmed and row.rows <= settings.EDSMART_ROSTER_INLINE_ROWS:
        roster_import_run(import_id=row.pk)
        row.refresh_from_db()
    elif confirmed or (requeue and row.status == S.QUEUED):
        pk = row.pk
        transaction.on_commit(lambda: current_app.send_task(TASK_NAME, args=[pk]))
    return row


def roster_import_run(*, import_id: int) -> bool:
    """Imports a queued upload, all or nothing; True if this call imported it.

    The row is locked and moved ``queued -> done`` in the import's own transaction: a second
    delivery of the task waits on the lock, then finds it done and does nothing. The import is
    refused (and a fresh preview stored) if the school changed since the preview.
    """
    try:
        with transaction.atomic():
            row = (
                RosterImport.objects.select_for_update()
                .select_related("school")
                .filter(pk=import_id, status=S.QUEUED)
                .first()
            )
            if row is None:
                return False
            if sha256_of(row.csv_text) != row.sha256:
                raise RuntimeError("the stored file does not match its checksum")
            total = row.preview.get("counts", {})
            total = total.get("students", 0) + total.get("guardians", 0)
            result = roster_import(
                school=row.school,
                file=_file(row.csv_text),
                expected=row.preview.get("fingerprint"),
                progress=lambda done, of: _publish(import_id, done, of),
            )
            moved = RosterImport.objects.filter(pk=import_id, status=S.QUEUED).update(
                status=S.DONE,
                csv_text="",
                result={
                    "students": result.students,
                    "guardians": result.guardians,
                    "students_created": result.students_created,
                    "guardians_created": result.guardians_created,
                },
                progress_done=total,
                progress_total=total,
                finished_at=timezone.now(),
            )
            if moved != 1:  # cannot happen: this transaction holds the row's lock
                raise RuntimeError(f"roster import {import_id} moved under its lock")
    except RosterChangedError as exc:
        _repreview(import_id, RosterPreview(rows=0, errors=[], plan=exc.plan), CHANGED)
    except RosterError as exc:
        _repreview(import_id, RosterPreview(rows=0, errors=exc.errors, plan=None), ERRORS_NOW)
    except Exception as exc:
        log.exception("roster import %s failed", import_id)
        RosterImport.objects.filter(pk=import_id, status=S.QUEUED).update(
            status=S.FAILED,
            csv_text="",
            message=f"The import failed and nothing was imported ({type(exc).__name__}). "
            "Upload the file again.",
            finished_at=timezone.now(),
        )
    else:
        return True
    return False


def roster_import_progress(*, roster_import_row: RosterImport) -> tuple[int | None, int]:
    """(people written so far, of how many); None for "not known" (Redis away or not begun)."""
    row = roster_import_row
    total = row.progress_total
    if row.status != S.QUEUED:
        return row.progress_done, total
    try:
        raw = redis_client().get(progress_key(row.pk))
    except redis.RedisError:
        return None, total
    if raw is None:
        return None, total
    done, _, of = raw.decode().partition("/")
    return int(done), int(of)


def progress_key(import_id: int) -> str:
    return f"edsmart:roster-import:{import_id}:progress"


def _publish(import_id: int, done: int, total: int) -> None:
    with suppress(redis.RedisError):  # progress is a courtesy; the import goes on
        redis_client().set(progress_key(import_id), f"{done}/{total}", ex=PROGRESS_TTL_SECONDS)


def _file(text: str) -> io.StringIO:
    # newline="" lets the csv module handle line breaks inside quoted cells.
    return io.StringIO(text, newline="")


def _apply_preview(row: RosterImport, preview: RosterPreview) -> None:
    if preview.plan is None:
        row.status = S.INVALID
        row.errors = [_error(e) for e in preview.errors[:ERROR_LIMIT]]
        row.preview = {"error_count": len(preview.errors)}
        row.progress_total = 0
    else:
        row.status = S.PREVIEWED
        row.errors = []
        row.preview = preview.plan.summary(limit=PREVIEW_LIMIT)
        counts = row.preview["counts"]
        row.progress_total = counts["students"] + counts["guardians"]


def _repreview(import_id: int, preview: RosterPreview, message: str) -> None:
    row = RosterImport.objects.filter(pk=import_id, status=S.QUEUED).first()
    if row is None:
        return
    _apply_preview(row, preview)
    if row.status == S.INVALID:
        row.csv_text = ""
    RosterImport.objects.filter(pk=import_id, status=S.QUEUED).update(
        status=row.status,
        errors=row.errors,
        preview=row.preview,
        progress_total=row.progress_total,
        csv_text=row.csv_text,
        message=message,
        confirmed_at=None,
    )


def _error(error: RowError) -> dict[str, object]:
    return {"line": error.line, "reason": error.reason}
