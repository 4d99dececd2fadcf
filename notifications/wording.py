"""Statuses in the words staff use, for the pages they read (the home page, the lists).

The models' choice labels stay as they are (the commands, the CSVs, the evidence page and the
ops runbook name them); these are what a teacher sees next to a message or a parent's address.
"""

from __future__ import annotations

from notifications.models import DeliveryStatus, Mailing

S = DeliveryStatus

DELIVERY_WORDS: dict[str, str] = {
    S.PENDING: "waiting to send",
    S.CLAIMED: "sending now",
    S.SUBMITTING: "sending now",
    S.SENT: "sent",
    S.RETRY_WAIT: "waiting to retry",
    S.FAILED: "failed",
    S.UNKNOWN: "outcome unknown: ops are looking at it",
    S.CANCELLED: "cancelled",
    S.SKIPPED: "not sent: address blocked after a bounce or complaint",
}

MAILING_WORDS: dict[str, str] = {
    Mailing.Status.SENDING: "sending",
    Mailing.Status.PAUSED: "paused",
    Mailing.Status.COMPLETED: "finished",
    Mailing.Status.CANCELLED: "cancelled",
}


def delivery_words(status: str) -> str:
    return DELIVERY_WORDS.get(status, status)


def mailing_words(status: str) -> str:
    return MAILING_WORDS.get(status, status)
