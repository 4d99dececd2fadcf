"""Staff forms for slips and broadcasts.

The rules live in one place: the model validators (title on one line, body size) run in the
ModelForm's model validation, and everything else comes from
``slips.services.message_validate_for_schedule``, so a draft saved here is refused for the same
reasons, in the same words, that scheduling it later would be.
"""

from __future__ import annotations

import copy
from typing import Any

from django.core.exceptions import ValidationError
from django.utils import timezone

from edsmart.admin_tenancy import TenantModelForm
from slips.models import SendStatus
from slips.services import message_validate_for_schedule

# Reported by the model validators already; the service repeats them for callers that skip
# model validation.
_MODEL_VALIDATED = frozenset({"title", "body"})


class SendableAdminForm(TenantModelForm):
    """A slip or broadcast edited in the admin: checked as if it were about to be scheduled.

    A draft may be saved without an audience (it is work in progress); once one is chosen it
    must reach at least one guardian, and send and due times must make sense.
    """

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        if self.instance.pk is not None and self.instance.status != SendStatus.DRAFT:
            return cleaned  # content is read-only outside draft; nothing here to check
        school = cleaned.get("school") or getattr(self.instance, "school", None)
        if school is None or "body" not in cleaned or "title" not in cleaned:
            return cleaned
        message = copy.copy(self.instance)
        message.school = school
        for name in ("title", "body", "audience", "send_at", "due_at"):
            if name in self.fields and name in cleaned:
                setattr(message, name, cleaned[name])
        try:
            message_validate_for_schedule(
                message=message, send_at=cleaned.get("send_at") or timezone.now()
            )
        except ValidationError as exc:
            for field, texts in exc.message_dict.items():
                if field in _MODEL_VALIDATED:
                    continue
                if field == "audience" and cleaned.get("audience") is None:
                    continue  # a draft without an audience yet is fine
                target = field if field in self.fields else None
                for text in texts:
                    self.add_error(target, text)
        return cleaned
