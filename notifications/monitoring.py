"""Read-only views of the pipeline for staff, ops and commands: counts, backlog, duplicates."""

from __future__ import annotations

from dataclasses import dataclass

from django.core.exceptions import ObjectDoesNotExist
from django.db.models import Count, Min, QuerySet
from django.utils import timezone

from notifications.models import Delivery, DeliveryEvent, DeliveryStatus, Mailing, SendingSwitch
from slips.models import Broadcast, School, Slip


def delivery_status_counts(*, deliveries: QuerySet[Delivery] | None = None) -> dict[str, int]:
    """Every status with its count (zeros included, so reports have a stable shape)."""
    qs = deliveries if deliveries is not None else Delivery.objects.all()
    found = dict(qs.order_by().values_list("status").annotate(n=Count("id")))
    return {status: found.get(status, 0) for status in DeliveryStatus.values}


def mailing_counts(*, mailing: Mailing) -> dict[str, int]:
    return delivery_status_counts(deliveries=Delivery.objects.filter(mailing=mailing))


def source_counts(*, source: Slip | Broadcast) -> dict[str, int]:
    key = "mailing__slip" if isinstance(source, Slip) else "mailing__broadcast"
    return delivery_status_counts(deliveries=Delivery.objects.filter(**{key: source}))


@dataclass(frozen=True)
class Backlog:
    claimable: int
    oldest_pending_seconds: float | None


def backlog() -> Backlog:
    qs = Delivery.objects.filter(
        status__in=[DeliveryStatus.PENDING, DeliveryStatus.RETRY_WAIT, DeliveryStatus.CLAIMED],
        mailing__status=Mailing.Status.SENDING,
    )
    agg = qs.aggregate(n=Count("id"), oldest=Min("created_at"))
    oldest = agg["oldest"]
    age = (timezone.now() - oldest).total_seconds() if oldest else None
    return Backlog(claimable=agg["n"], oldest_pending_seconds=age)


def duplicate_sends() -> list[dict]:
    """(mailing, address) pairs with more than one accepted send. Must always be empty."""
    by_delivery = (
        DeliveryEvent.objects.filter(to_status=DeliveryStatus.SENT)
        .values("delivery_id", "delivery__mailing_id", "delivery__email_normalized")
        .annotate(n=Count("id"))
        .filter(n__gt=1)
    )
    by_pair = (
        Delivery.objects.filter(status=DeliveryStatus.SENT)
        .values("mailing_id", "email_normalized")
        .annotate(n=Count("id"))
        .filter(n__gt=1)
    )
    found = [
        {
            "mailing_id": row["delivery__mailing_id"],
            "email": row["delivery__email_normalized"],
            "accepted": row["n"],
        }
        for row in by_delivery
    ]
    found += [
        {"mailing_id": row["mailing_id"], "email": row["email_normalized"], "accepted": row["n"]}
        for row in by_pair
    ]
    return found


def sending_status() -> dict:
    switch = SendingSwitch.objects.filter(pk=1).first()
    return {
        "global_paused": bool(switch and switch.paused),
        "global_reason": switch.reason if switch else "",
        "schools_paused": list(
            School.objects.filter(sending_paused=True).values_list("slug", flat=True)
        ),
        "mailings_sending": Mailing.objects.filter(status=Mailing.Status.SENDING).count(),
        "mailings_paused": Mailing.objects.filter(status=Mailing.Status.PAUSED).count(),
    }


class UnknownMessage(LookupError):
    pass


def message_lookup(ref: str) -> Mailing | Slip | Broadcast:
    """Resolve an ops-facing message reference.

    ``42`` is mailing 42 (what ``delivery_report`` lists); ``slip:7`` and ``broadcast:7`` name
    the staff-facing object, which is what ``compose`` prints.
    """
    kind, _, raw_id = ref.rpartition(":")
    try:
        pk = int(raw_id)
    except ValueError:
        raise UnknownMessage(f"{ref!r} is not a message id (42, slip:7 or broadcast:7)") from None
    model = {"": Mailing, "mailing": Mailing, "slip": Slip, "broadcast": Broadcast}.get(kind)
    if model is None:
        raise UnknownMessage(f"{kind!r} is not a message kind (slip, broadcast or mailing)")
    try:
        return model.objects.select_related("school").get(pk=pk)
    except ObjectDoesNotExist:
        raise UnknownMessage(f"no {model._meta.verbose_name} with id {pk}") from None


def mailings_of(obj: Mailing | Slip | Broadcast) -> QuerySet[Mailing]:
    if isinstance(obj, Mailing):
        return Mailing.objects.filter(pk=obj.pk)
    key = "slip" if isinstance(obj, Slip) else "broadcast"
    return Mailing.objects.filter(**{key: obj})
