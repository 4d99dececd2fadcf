"""Signing and checking parents' link tokens. A leaf: it imports nothing of ours.

Kept apart from the parents' pages (``slips.links``) because the email side needs only to
make a link, and must not pull in the pages' models and services to do it: that import was
one edge of a cycle between the two apps.

The token is a Django signature over the delivery id with a dedicated salt. The id inside is
trusted only once the signature checks out; expiry belongs to the delivery (see
``slips.links``), not to the token's age, so there is no ``max_age`` here.
"""

from __future__ import annotations

import functools

from django.conf import settings
from django.core import signing

LINK_SALT = "edsmart.parent-link.v1"
# Real tokens are ~40 characters; anything far longer is not ours and is not worth verifying.
MAX_TOKEN_LENGTH = 256


class LinkError(Exception):
    """A parent's link that cannot be honoured."""


class LinkInvalid(LinkError):
    """Tampered, forged, malformed or pointing at nothing. One error for all of these, so the
    page cannot tell a prober whether a message or a family exists."""


@functools.lru_cache(maxsize=4)
def _signer(secret_key: str) -> signing.TimestampSigner:
    return signing.TimestampSigner(key=secret_key, salt=LINK_SALT)


def delivery_token(*, delivery_id: int) -> str:
    """The same token as ``signing.dumps({"d": id}, salt=LINK_SALT)`` (so ``signing.loads``
    checks it), from a signer made once per key: one is made for every email of a broadcast,
    and building the signer each time was about half of the cost."""
    return _signer(settings.SECRET_KEY).sign_object({"d": delivery_id})


def parent_link(*, delivery_id: int) -> str:
    return f"{settings.SITE_URL}/p/{delivery_token(delivery_id=delivery_id)}/"


def delivery_id_from_token(token: str) -> int:
    """The delivery id a genuine token carries; LinkInvalid for anything else."""
    if not token or len(token) > MAX_TOKEN_LENGTH:
        raise LinkInvalid
    try:
        payload = signing.loads(token, salt=LINK_SALT)
    except (signing.BadSignature, ValueError, TypeError) as exc:
        raise LinkInvalid from exc
    delivery_id = payload.get("d") if isinstance(payload, dict) else None
    if type(delivery_id) is not int or delivery_id <= 0:
        raise LinkInvalid
    return delivery_id
