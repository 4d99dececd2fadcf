"""Accepted sends are counted on the delivery row instead of an event row per send.

The backfill gives every existing row its count of events into ``sent`` (what the duplicate
check counted until now), so a duplicate recorded before this migration still shows. The
partial index holds only rows accepted more than once, so it is built concurrently (the
build reads the whole table) and stays empty while all is well.
"""

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models

BACKFILL = """
    UPDATE notifications_delivery d SET accepted = e.n
    FROM (
        SELECT delivery_id, count(*) AS n FROM notifications_deliveryevent
        WHERE to_status = 'sent' GROUP BY delivery_id
    ) e
    WHERE d.id = e.delivery_id
"""


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("notifications", "0006_delivery_claimable_in_mailing"),
    ]

    operations = [
        migrations.AddField(
            model_name="delivery",
            name="accepted",
            field=models.PositiveSmallIntegerField(db_default=0, default=0),
        ),
        migrations.RunSQL(BACKFILL, reverse_sql=migrations.RunSQL.noop),
        AddIndexConcurrently(
            model_name="delivery",
            index=models.Index(
                condition=models.Q(("accepted__gt", 1)),
                fields=["mailing"],
                name="delivery_duplicated",
            ),
        ),
    ]
