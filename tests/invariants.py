"""The exactly-once invariants every pipeline test ends with (DESIGN.md "Proving it")."""

from __future__ import annotations

from collections import Counter

from notifications.models import TERMINAL_STATUSES, Delivery, DeliveryStatus
from tests.smtp_server import Accepted


def assert_exactly_once(accepted: list[Accepted], *, mailing_ids: list[int] | None = None) -> dict:
    rows = Delivery.objects.all()
    if mailing_ids is not None:
        rows = rows.filter(mailing_id__in=mailing_ids)
    rows = {d.pk: d for d in rows}
    ours = [a for a in accepted if a.delivery_id in rows]
    per_delivery = Counter(a.delivery_id for a in ours)
    per_pair = Counter((rows[a.delivery_id].mailing_id, a.rcpt) for a in ours)

    dupes = {k: n for k, n in per_pair.items() if n > 1}
    assert not dupes, f"duplicate accepted sends per (mailing, recipient): {dupes}"
    for d in rows.values():
        assert d.status in TERMINAL_STATUSES, f"delivery {d.pk} not terminal: {d.status}"
        n = per_delivery.get(d.pk, 0)
        if d.status == DeliveryStatus.SENT:
            assert n == 1, f"sent delivery {d.pk} matched {n} accepted messages"
            assert ours and d.message_id_header
        elif d.status == DeliveryStatus.UNKNOWN:
            assert d.last_error, f"unknown delivery {d.pk} has no explanation"
            assert n <= 1
        else:
            assert n == 0, f"{d.status} delivery {d.pk} was accepted {n} times"
            if d.status in (DeliveryStatus.FAILED, DeliveryStatus.SKIPPED):
                assert d.last_error, f"{d.status} delivery {d.pk} has no reason"
    for a in ours:
        assert (
            a.message_id == rows[a.delivery_id].message_id_header
            or not rows[a.delivery_id].message_id_header
        )
    return dict(Counter(d.status for d in rows.values()))
