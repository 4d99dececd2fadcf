"""Schema changes made while sends go on, for migrations that must not stop the send engine.

A unique guard is replaced by a wider one in an order that keeps a guard in force at every
moment: the new index is built concurrently (no lock that blocks writes), checked valid, and
only then is the old one dropped. A concurrent build cannot run in a transaction, so the
migrations using this are not atomic; a build that failed leaves an invalid index, which
enforces nothing, so a rerun drops it and builds again. The brief exclusive locks (making an
index a constraint, adding a foreign key, dropping a constraint) wait at most 2 s each time
and are tried again, so that a long transaction elsewhere delays the migration instead of
queueing every send behind its lock.

Used by notifications 0012 and 0013 and slips 0006 (docs/scaling.md, "Schema changes to make
now"). The names interpolated into SQL are the migrations' own constants, never input.
"""

from __future__ import annotations

import time
from typing import Any

from django.db import transaction
from django.db.utils import OperationalError

LOCK_TRIES = 30


def _one(schema_editor: Any, sql: str, params: list | None = None) -> tuple | None:
    with schema_editor.connection.cursor() as cur:
        cur.execute(sql, params or [])
        return cur.fetchone()


def _run(schema_editor: Any, sql: str) -> None:
    with schema_editor.connection.cursor() as cur:
        cur.execute(sql)


def briefly_locked(schema_editor: Any, sql: str) -> None:
    """``sql`` in its own transaction with a 2 s lock timeout, tried until it gets its lock."""
    for attempt in range(LOCK_TRIES):
        try:
            with transaction.atomic(using=schema_editor.connection.alias):
                _run(schema_editor, "SET LOCAL lock_timeout = '2s'")
                _run(schema_editor, sql)
            return
        except OperationalError:
            if attempt == LOCK_TRIES - 1:
                raise
            time.sleep(1)


def constraint_exists(schema_editor: Any, name: str) -> bool:
    found = _one(schema_editor, "SELECT count(*) FROM pg_constraint WHERE conname = %s", [name])
    return bool(found and found[0])


def unique_index(
    schema_editor: Any, *, table: str, name: str, columns: str, where: str = ""
) -> None:
    """A valid ``UNIQUE`` index ``name`` on ``table (columns) [WHERE where]``, built
    concurrently; an invalid one left by a failed build is dropped and built again."""
    found = _one(
        schema_editor,
        "SELECT i.indisvalid FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid "
        "WHERE c.relname = %s",
        [name],
    )
    if found is not None and found[0]:
        return
    if found is not None:
        _run(schema_editor, f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"')
    predicate = f" WHERE {where}" if where else ""
    _run(
        schema_editor,
        f'CREATE UNIQUE INDEX CONCURRENTLY "{name}" ON {table} ({columns}){predicate}',
    )


def unique_constraint(schema_editor: Any, *, table: str, name: str, columns: str) -> None:
    """``UNIQUE (columns)`` named ``name``, its index built concurrently first."""
    if constraint_exists(schema_editor, name):
        return
    unique_index(schema_editor, table=table, name=name, columns=columns)
    briefly_locked(
        schema_editor, f'ALTER TABLE {table} ADD CONSTRAINT "{name}" UNIQUE USING INDEX "{name}"'
    )


def foreign_key(schema_editor: Any, *, table: str, name: str, columns: str, target: str) -> None:
    """A foreign key added ``NOT VALID`` (no scan under the table lock), then validated (a
    scan under a lock that lets inserts and updates go on)."""
    if not constraint_exists(schema_editor, name):
        briefly_locked(
            schema_editor,
            f'ALTER TABLE {table} ADD CONSTRAINT "{name}" FOREIGN KEY ({columns}) '
            f"REFERENCES {target} DEFERRABLE INITIALLY DEFERRED NOT VALID",
        )
    _run(schema_editor, f'ALTER TABLE {table} VALIDATE CONSTRAINT "{name}"')


def drop_constraint(schema_editor: Any, *, table: str, name: str) -> None:
    briefly_locked(schema_editor, f'ALTER TABLE {table} DROP CONSTRAINT IF EXISTS "{name}"')


def drop_index(schema_editor: Any, *, name: str) -> None:
    """Dropped concurrently: it waits for the transactions using the index, blocking none."""
    _run(schema_editor, f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"')
