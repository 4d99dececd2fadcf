"""Closed mailings summarised once, and the indexes that keep reads off a year of history.

The new indexes on the deliveries and events tables are built concurrently (each build reads
the whole table; sending goes on meanwhile), so the migration is not atomic. The plain index
on ``delivery.school_id`` goes last, once ``(school_id, id)`` can serve its lookups. Then every
closed mailing with no open row is summarised, as the sweep does from now on, dated by the
last change of its rows (the sweep dates a summary when it writes it, seconds after that): the
windowed reads take "summarised since T" as "a row may have changed since T", and a year of
summaries all dated today would send them through the whole year for a week.
"""

import django.db.models.deletion
from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models
from django.db.migrations.exceptions import IrreversibleError

# Frozen copy of notifications.summaries.SUMMARISE_SQL as of this migration, for every
# closed mailing at once.
SUMMARISE_ALL = """
    WITH target AS (
        SELECT m.id, m.school_id, m.completed_at, m.created_at FROM notifications_mailing m
        WHERE NOT m.summarised AND m.status IN ('completed', 'cancelled')
          AND NOT EXISTS (SELECT 1 FROM notifications_delivery o
                          WHERE o.mailing_id = m.id
                            AND o.status IN ('pending', 'claimed', 'submitting', 'retry_wait'))
    ), counted AS (
        SELECT t.id, t.school_id,
               count(d.id) FILTER (WHERE d.status = 'sent') AS sent,
               count(d.id) FILTER (WHERE d.status = 'failed') AS failed,
               count(d.id) FILTER (WHERE d.status = 'unknown') AS unknown,
               count(d.id) FILTER (WHERE d.status = 'cancelled') AS cancelled,
               count(d.id) FILTER (WHERE d.status = 'skipped') AS skipped,
               coalesce(sum(d.accepted), 0) AS accepted, count(d.opened_at) AS opened,
               coalesce(max(d.updated_at), max(t.completed_at), max(t.created_at))
                   AS last_change
        FROM target t LEFT JOIN notifications_delivery d ON d.mailing_id = t.id
        GROUP BY t.id, t.school_id
    ), written AS (
        INSERT INTO notifications_mailingsummary
            (mailing_id, school_id, sent, failed, unknown, cancelled, skipped, accepted, opened,
             summarised_at)
        SELECT id, school_id, sent, failed, unknown, cancelled, skipped, accepted, opened,
               last_change
        FROM counted
        ON CONFLICT (mailing_id) DO NOTHING
        RETURNING mailing_id
    )
    UPDATE notifications_mailing m SET summarised = true FROM written w WHERE m.id = w.mailing_id
"""

UNSUMMARISE_ALL = """
    DELETE FROM notifications_mailingsummary;
    UPDATE notifications_mailing SET summarised = false WHERE summarised;
"""


def unsummarise_all(apps, schema_editor) -> None:
    """Going back is safe only while retention has removed nothing: an archived mailing's
    summary is all that is left of its deliveries."""
    summary = apps.get_model("notifications", "MailingSummary")
    if summary.objects.filter(archived_at__isnull=False).exists():
        raise IrreversibleError(
            "retention has archived mailings: their summaries hold the only record of their "
            "deliveries, so 0009 cannot be unapplied"
        )
    schema_editor.execute(UNSUMMARISE_ALL)


def summarise_all(apps, schema_editor) -> None:
    schema_editor.execute(SUMMARISE_ALL)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("notifications", "0008_delivery_counters_without_checks"),
        ("slips", "0004_broadcast_urgent"),
    ]

    operations = [
        migrations.CreateModel(
            name="MailingSummary",
            fields=[
                (
                    "mailing",
                    models.OneToOneField(
                        on_delete=django.db.models.deletion.CASCADE,
                        primary_key=True,
                        related_name="summary",
                        serialize=False,
                        to="notifications.mailing",
                    ),
                ),
                (
                    "school",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="+",
                        to="slips.school",
                    ),
                ),
                ("sent", models.IntegerField(default=0)),
                ("failed", models.IntegerField(default=0)),
                ("unknown", models.IntegerField(default=0)),
                ("cancelled", models.IntegerField(default=0)),
                ("skipped", models.IntegerField(default=0)),
                ("accepted", models.IntegerField(default=0)),
                ("opened", models.IntegerField(default=0)),
                ("summarised_at", models.DateTimeField(db_index=True)),
                ("archived_at", models.DateTimeField(blank=True, null=True)),
                ("rows_removed_at", models.DateTimeField(blank=True, null=True)),
            ],
            options={"verbose_name_plural": "mailing summaries"},
        ),
        migrations.AddField(
            model_name="mailing",
            name="summarised",
            field=models.BooleanField(db_default=False, default=False),
        ),
        AddIndexConcurrently(
            model_name="mailing",
            index=models.Index(
                condition=models.Q(("summarised", False)),
                fields=["id"],
                name="mailing_unsummarised",
            ),
        ),
        AddIndexConcurrently(
            model_name="mailing",
            index=models.Index(fields=["-created_at", "-id"], name="mailing_newest"),
        ),
        AddIndexConcurrently(
            model_name="delivery",
            index=models.Index(
                condition=models.Q(("status", "unknown")),
                fields=["school"],
                name="delivery_unknown",
            ),
        ),
        AddIndexConcurrently(
            model_name="delivery",
            index=models.Index(fields=["school", "id"], name="delivery_school_id_order"),
        ),
        AddIndexConcurrently(
            model_name="deliveryevent",
            index=models.Index(fields=["to_status", "at"], name="deliveryevent_status_at"),
        ),
        migrations.AlterField(
            model_name="delivery",
            name="school",
            field=models.ForeignKey(
                db_index=False,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="deliveries",
                to="slips.school",
            ),
        ),
        migrations.RunPython(summarise_all, reverse_code=unsummarise_all),
    ]
