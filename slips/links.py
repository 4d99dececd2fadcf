"""Parents' links: signed, scoped to one delivery (one recipient, one message), expiring.

The token is a Django signature over the delivery id with a dedicated salt, so it cannot be
guessed or altered to reach another family, message or school.
"""

from __future__ import annotations

from django.conf import settings
from django.core import signing

LINK_SALT = "edsmart.parent-link.v1"


def delivery_token(*, delivery_id: int) -> str:
    return signing.dumps({"d": delivery_id}, salt=LINK_SALT, compress=True)


def parent_link(*, delivery_id: int) -> str:
    return f"{settings.SITE_URL}/p/{delivery_token(delivery_id=delivery_id)}/"
