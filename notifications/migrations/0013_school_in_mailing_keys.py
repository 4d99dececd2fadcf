"""The school in the mailings' keys (docs/scaling.md, "Schema changes to make now", 3 and 5),
as 0012 did for the deliveries', and in the same order, so that a guard holds at every moment:

1. Composite foreign keys: a mailing's ``(school_id, slip_id)`` is its slip's ``(school_id,
   id)``, and likewise for a broadcast (targets: slips 0006). Added ``NOT VALID``, then
   validated under a lock that lets dispatch go on. A broadcast's mailing has no slip and a
   slip's no broadcast: a key with a NULL column is not checked (``MATCH SIMPLE``).
2. Dispatch's guards, one mailing per slip round and per broadcast, become ``(school_id,
   slip_id, round)`` and ``(school_id, broadcast_id)``. Thanks to 1 a message's mailings all
   carry its school, so each is exactly as strict as the one it replaces. The new partial
   unique index is built concurrently, and the old one dropped (concurrently) only after it.
   Nothing names these indexes as a conflict target: dispatch wins its message by a
   conditional UPDATE and creates its mailing after, so the index is the second line.

Partial unique indexes cannot become table constraints, so they stay indexes, as Django makes
a conditional ``UniqueConstraint``. Not atomic, for the concurrent builds (see
``edsmart.online_schema``).
"""

from django.db import migrations, models
from django.db.models import Q

from edsmart.online_schema import drop_constraint, drop_index, foreign_key, unique_index

M = "notifications_mailing"
KEYS = (
    ("mailing_slip_same_school", "school_id, slip_id", "slips_slip (school_id, id)"),
    (
        "mailing_broadcast_same_school",
        "school_id, broadcast_id",
        "slips_broadcast (school_id, id)",
    ),
)
GUARDS = (
    # (old name, old columns, new name, new columns, predicate)
    (
        "mailing_one_per_slip_round",
        "slip_id, round",
        "mailing_one_per_school_slip_round",
        "school_id, slip_id, round",
        "slip_id IS NOT NULL",
    ),
    (
        "mailing_one_per_broadcast",
        "broadcast_id",
        "mailing_one_per_school_broadcast",
        "school_id, broadcast_id",
        "broadcast_id IS NOT NULL",
    ),
)


def forwards(apps, schema_editor) -> None:
    for name, columns, target in KEYS:
        foreign_key(schema_editor, table=M, name=name, columns=columns, target=target)
    for old, _, new, columns, where in GUARDS:
        unique_index(schema_editor, table=M, name=new, columns=columns, where=where)
        drop_index(schema_editor, name=old)


def backwards(apps, schema_editor) -> None:
    for old, columns, new, _, where in GUARDS:
        unique_index(schema_editor, table=M, name=old, columns=columns, where=where)
        drop_index(schema_editor, name=new)
    for name, _, _ in KEYS:
        drop_constraint(schema_editor, table=M, name=name)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("notifications", "0012_school_in_delivery_keys"),
        ("slips", "0006_school_in_message_keys"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunPython(forwards, backwards)],
            state_operations=[
                migrations.RemoveConstraint(model_name="mailing", name="mailing_one_per_slip_round"),
                migrations.RemoveConstraint(model_name="mailing", name="mailing_one_per_broadcast"),
                migrations.AddConstraint(
                    model_name="mailing",
                    constraint=models.UniqueConstraint(
                        condition=Q(slip__isnull=False),
                        fields=("school", "slip", "round"),
                        name="mailing_one_per_school_slip_round",
                    ),
                ),
                migrations.AddConstraint(
                    model_name="mailing",
                    constraint=models.UniqueConstraint(
                        condition=Q(broadcast__isnull=False),
                        fields=("school", "broadcast"),
                        name="mailing_one_per_school_broadcast",
                    ),
                ),
            ],
        ),
    ]
