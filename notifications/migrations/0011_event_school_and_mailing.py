"""Delivery events carry their delivery's school and mailing (docs/scaling.md, "Schema
changes to make now").

Expand only: both columns are added nullable (no table rewrite, a brief lock), the moves write
them from this release on (``transitions._event_sql``), and the existing events are filled in
batches of 10,000, each its own short transaction, so sends go on meanwhile. Making them
NOT NULL is the next release's step, once no process of an older release can still write an
event without them (check ``... WHERE school_id IS NULL`` is empty first).
"""

import django.db.models.deletion
from django.db import migrations, models

BATCH = 10_000

FILL_SQL = """
    UPDATE notifications_deliveryevent e
    SET school_id = d.school_id, mailing_id = d.mailing_id
    FROM notifications_delivery d
    WHERE e.delivery_id = d.id AND e.id >= %s AND e.id < %s AND e.school_id IS NULL
"""


def fill(apps, schema_editor) -> None:
    connection = schema_editor.connection
    with connection.cursor() as cur:
        cur.execute("SELECT min(id), max(id) FROM notifications_deliveryevent")
        low, high = cur.fetchone()
    if low is None:
        return
    for start in range(low, high + 1, BATCH):
        with connection.cursor() as cur:
            cur.execute(FILL_SQL, [start, start + BATCH])


class Migration(migrations.Migration):
    # Each batch of the fill commits on its own (a migration's one transaction would hold
    # every event row's lock until the end).
    atomic = False

    dependencies = [
        ("notifications", "0010_provider_events"),
        ("slips", "0005_roster_import"),
    ]

    operations = [
        migrations.AddField(
            model_name="deliveryevent",
            name="mailing",
            field=models.ForeignKey(
                db_index=False,
                null=True,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="+",
                to="notifications.mailing",
            ),
        ),
        migrations.AddField(
            model_name="deliveryevent",
            name="school",
            field=models.ForeignKey(
                db_index=False,
                null=True,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="+",
                to="slips.school",
            ),
        ),
        migrations.RunPython(fill, migrations.RunPython.noop, elidable=True),
    ]
