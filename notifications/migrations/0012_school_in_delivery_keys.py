"""The school in the deliveries' keys, while the tables are small (docs/scaling.md, "Schema
changes to make now", 2 to 4): what a database sharded by school requires of every unique key
and foreign key, and a rewrite of billions of rows under load if left for later.

1. ``UNIQUE (school_id, id)`` on mailings: the target of the deliveries' composite foreign
   key. Not on deliveries: a unique index looks for a live duplicate at each insert, and a
   send inserts three row versions into every index of the table, so it would cost every
   email three heap visits more than the plain ``(school_id, id)`` index it keeps. The events'
   ``(school_id, delivery_id)`` is written from the delivery row by the same statement
   (``transitions._event_sql``); its foreign key waits for Citus, with the primary key swap.
2. A composite foreign key: a delivery's ``(school_id, mailing_id)`` is its mailing's
   ``(school_id, id)``. Added ``NOT VALID`` (no scan under the table lock), then validated (a
   scan under a lock that lets sends go on). Checked when a row is inserted (the fan-out), not
   when a send updates it (its key columns never change).
3. The fan-out's exactly-once guard becomes ``UNIQUE (school_id, mailing_id,
   email_normalized)``. Thanks to 2 a mailing's rows all carry its school, so it is exactly as
   strict as ``(mailing_id, email_normalized)``. A guard holds at every moment: the new unique
   index is built (concurrently) and made a constraint before the old one is dropped, and the
   fan-out's ``INSERT ... ON CONFLICT DO NOTHING`` names no conflict target, so it skips a pair
   whichever index catches it, in old code and new.

Concurrent builds cannot run in a transaction, so the migration is not atomic. A build that
failed leaves an invalid index, which enforces nothing: a rerun drops it and builds again. The
brief exclusive locks (making an index a constraint, dropping one) wait at most 2 s each time,
and are tried again, so a long transaction elsewhere delays the migration instead of stopping
every send behind its lock queue.
"""

from django.db import migrations, models

from edsmart.online_schema import drop_constraint, foreign_key, unique_constraint

D = "notifications_delivery"
M = "notifications_mailing"


def forwards(apps, schema_editor) -> None:
    unique_constraint(
        schema_editor, table=M, name="mailing_school_id_key", columns="school_id, id"
    )
    foreign_key(
        schema_editor,
        table=D,
        name="delivery_mailing_same_school",
        columns="school_id, mailing_id",
        target=f"{M} (school_id, id)",
    )
    unique_constraint(
        schema_editor,
        table=D,
        name="delivery_one_per_school_mailing_address",
        columns="school_id, mailing_id, email_normalized",
    )
    drop_constraint(schema_editor, table=D, name="delivery_one_per_mailing_address")


def backwards(apps, schema_editor) -> None:
    unique_constraint(
        schema_editor,
        table=D,
        name="delivery_one_per_mailing_address",
        columns="mailing_id, email_normalized",
    )
    drop_constraint(schema_editor, table=D, name="delivery_one_per_school_mailing_address")
    drop_constraint(schema_editor, table=D, name="delivery_mailing_same_school")
    drop_constraint(schema_editor, table=M, name="mailing_school_id_key")


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("notifications", "0011_event_school_and_mailing"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunPython(forwards, backwards)],
            state_operations=[
                migrations.AddConstraint(
                    model_name="mailing",
                    constraint=models.UniqueConstraint(
                        fields=("school", "id"), name="mailing_school_id_key"
                    ),
                ),
                migrations.RemoveConstraint(
                    model_name="delivery", name="delivery_one_per_mailing_address"
                ),
                migrations.AddConstraint(
                    model_name="delivery",
                    constraint=models.UniqueConstraint(
                        fields=("school", "mailing", "email_normalized"),
                        name="delivery_one_per_school_mailing_address",
                    ),
                ),
            ],
        ),
    ]
