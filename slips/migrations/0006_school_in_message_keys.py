"""``UNIQUE (school_id, id)`` on slips and broadcasts: the targets of the mailings' composite
foreign keys (notifications 0013; docs/scaling.md, "Schema changes to make now", 3 and 5).
Built concurrently, then made a constraint under a brief lock, so scheduling and dispatch go
on meanwhile (``edsmart.online_schema``)."""

from django.db import migrations, models

from edsmart.online_schema import drop_constraint, unique_constraint

KEYS = (
    ("slips_slip", "slips_slip_school_id_key"),
    ("slips_broadcast", "slips_broadcast_school_id_key"),
)


def forwards(apps, schema_editor) -> None:
    for table, name in KEYS:
        unique_constraint(schema_editor, table=table, name=name, columns="school_id, id")


def backwards(apps, schema_editor) -> None:
    for table, name in KEYS:
        drop_constraint(schema_editor, table=table, name=name)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("slips", "0005_roster_import"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunPython(forwards, backwards)],
            state_operations=[
                migrations.AddConstraint(
                    model_name="slip",
                    constraint=models.UniqueConstraint(
                        fields=("school", "id"), name="slips_slip_school_id_key"
                    ),
                ),
                migrations.AddConstraint(
                    model_name="broadcast",
                    constraint=models.UniqueConstraint(
                        fields=("school", "id"), name="slips_broadcast_school_id_key"
                    ),
                ),
            ],
        ),
    ]
