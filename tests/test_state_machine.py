"""A Hypothesis stateful test of the delivery state machine (DESIGN.md "One delivery's life").

Unit tests in test_pipeline.py each walk one path through the machine. The faults that break
exactly-once live in the interleavings: a worker that pauses after ``250`` while the sweeper
gives up on it, a claim that expires and is re-claimed while its first holder wakes up, a
cancel between start and record. Here Hypothesis generates those interleavings by calling the
pipeline's public steps directly (three worker processes, each holding a batch of claims, a
sweeper, staff and ops), against the real PostgreSQL and the real SMTP server from
conftest.py, whose faults it injects per send. After every step the cheap
invariants are checked against the server's record of what it accepted (the ground truth);
at the end every worker dies, the dust settles, and every row must be terminal with
``tests.invariants.assert_exactly_once`` passing.

What the test itself must not do is cause a duplicate a real operator could not avoid: it
resolves an ``unknown`` row only as the server's record says, and only once no worker that
could still send it is alive (in production: after the task's hard time limit has passed).

Over 400 lines on purpose: a Hypothesis state machine is one class whose rules and
invariants only make sense together.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass

import pytest
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.mail import get_connection
from django.core.mail.backends.smtp import EmailBackend as SMTPBackend
from django.db.models import Q
from django.test import override_settings
from django.utils import timezone
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from notifications import batch, compose, controls, dispatch, nudges, selectors, sweep, transitions
from notifications.controls import message_cancel, message_pause, message_resume
from notifications.mailer import Outcome, SendResult, send_one
from notifications.models import (
    TERMINAL_STATUSES,
    Delivery,
    DeliveryStatus,
    Mailing,
    SendingSwitch,
)
from notifications.rendering import message_id_for
from slips.models import Broadcast, SendStatus
from slips.services import message_schedule
from tests import factories
from tests.invariants import assert_exactly_once
from tests.smtp_server import Behaviour

S = DeliveryStatus

MAX_ATTEMPTS = 3
# Low, so that examples reach it: a row whose worker dies with it twice fails.
MAX_LOST_CLAIMS = 2
# Claims handed to claims_release, per delivery (counted by a pass-through spy).
RELEASES_OFFERED: Counter[int] = Counter()
# A stall longer than the client's timeout turns a send into ``unknown``: the client hangs up
# after STALL_TIMEOUT and the server then abandons the message, so a stall is never accepted.
# Only sends meant to stall use the short timeout (others keep EMAIL_TIMEOUT from the test
# settings): on a loaded machine a short timeout would turn ordinary sends into ``unknown``
# at random, and ground truth that changes between runs makes Hypothesis's replays flaky.
STALL_TIMEOUT = 0.5
STALL_SECONDS = 4.0

hypothesis_settings.register_profile(
    "state-machine",
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# For a longer hunt: EDSMART_STATE_MACHINE_PROFILE=state-machine-long.
hypothesis_settings.register_profile(
    "state-machine-long",
    parent=hypothesis_settings.get_profile("state-machine"),
    max_examples=600,
    stateful_step_count=50,
)
PROFILE = os.environ.get("EDSMART_STATE_MACHINE_PROFILE", "state-machine")

# What the server answers to one send, and what the mailer must make of it. "ok" is listed
# several times so that most sends succeed and rows get far enough to meet late events.
REPLIES: dict[str, tuple[Behaviour, Outcome]] = {
    "ok": (Behaviour(), Outcome.ACCEPTED),
    "rcpt_450": (Behaviour(rcpt_reply="450 4.2.0 Mailbox busy"), Outcome.RETRY),
    "rcpt_550": (Behaviour(rcpt_reply="550 5.1.1 No such user"), Outcome.FAILED),
    "data_450": (Behaviour(data_reply="450 4.2.0 Mailbox busy"), Outcome.RETRY),
    "data_554": (Behaviour(data_reply="554 5.6.0 Rejected"), Outcome.FAILED),
    "stall": (Behaviour(stall=STALL_SECONDS), Outcome.UNKNOWN),
}
REPLY_CHOICES = ["ok", "ok", "ok", "rcpt_450", "rcpt_550", "data_450", "data_554", "stall"]
WORKER_ACTIONS = [*REPLY_CHOICES, "crash"]
# Three worker processes: (mailing index or None for any, batch size).
WORKERS = [(0, 2), (1, 2), (None, 3)]

CLAIMED, STARTED, SENT = "claimed", "started", "sent"
# What passing time does to the rows, before a sweep.
RUN_OUT = {
    "claim leases": [S.CLAIMED],
    "submit leases": [S.SUBMITTING],
    "all leases": [S.CLAIMED, S.SUBMITTING],
    "retries due": [S.RETRY_WAIT],
}
# Every operation, listed as often as it should be drawn (about: workers 1/2, sweeps 1/5,
# staff 1/8, batch_send 1/9, resolutions 1/14). Hypothesis shrinks towards the first.
OPS: list[tuple] = [
    *[("worker", slot, action) for slot in range(len(WORKERS)) for action in WORKER_ACTIONS],
    *[("sweep", after) for after in ("nothing", *RUN_OUT)],
    *[("sweep", after) for after in ("nothing", *RUN_OUT)],
    ("staff", "pause all", 0),
    ("staff", "resume all", 0),
    *[("staff", "toggle pause", i) for i in range(2)],
    *[("staff", "cancel", i) for i in range(3)],
    *[("batch", None, reply) for reply in ("ok", "rcpt_450", "data_554", "stall")],
    ("batch", 0, "ok"),
    ("batch", 1, "ok"),
    *[("resolve_unknown", i, resend) for i in range(2) for resend in (False, True)],
]
# Rows in these states must never have had a message accepted for them.
NEVER_ACCEPTED = {S.PENDING, S.CLAIMED, S.RETRY_WAIT, S.FAILED, S.CANCELLED, S.SKIPPED}


@dataclass
class Hand:
    """One worker's grip on a claim: claimed, started (row is submitting), or sent.

    ``sent`` is a worker that has the server's answer and has not recorded it yet, as
    batch_send holds each outcome until the next start: it may be slow (and record late,
    after the sweeper gave up on it) or die (and never record).
    """

    claim: transitions.Claimed
    stage: str
    result: SendResult | None = None

    def __repr__(self) -> str:
        return f"Hand(d{self.claim.id}/a{self.claim.attempt}, {self.stage})"


class DataTracker:
    """Wraps the server's DATA hook to tell when every DATA exchange has finished.

    After a stall the client gives up first; whether the server then records the message
    depends on when it notices the hang-up. The test waits until the server has decided, so
    that the ground truth it resolves ``unknown`` rows by is final.
    """

    def __init__(self, handler: object) -> None:
        self.original = handler.handle_DATA
        self.started = 0
        self.finished = 0
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.started += 1
        try:
            return await self.original(server, session, envelope)
        finally:
            with self.lock:
                self.finished += 1

    def wait_idle(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.started == self.finished:
                    return
            time.sleep(0.01)
        raise AssertionError("the SMTP server's DATA handler never finished")


class DeliveryMachine(RuleBasedStateMachine):
    """Two broadcasts of one school, fanned out, driven by workers, a sweeper and staff."""

    smtp = None  # the session's SMTP server, set by the test
    tracker: DataTracker | None = None

    def __init__(self) -> None:
        super().__init__()
        # Every step commits for real, as in production (the batch refuses to run inside a
        # transaction); each example starts from empty tables and empties them in teardown.
        factories.empty_app_tables()
        self.clean = True
        self.smtp.handler.reset()
        school = factories.make_school()
        for _ in range(3):
            factories.make_family(school=school)
        # Siblings whose guardians share an address (differently cased): one row, one email.
        kids = [factories.make_student(school=school) for _ in range(2)]
        factories.make_guardian(school=school, students=kids[:1], email="Home@Example.net")
        factories.make_guardian(school=school, students=kids[1:], email="home@example.net")
        self.sources = [
            message_schedule(
                message=factories.make_broadcast(school=school), send_at=timezone.now()
            )
            for _ in range(2)
        ]
        self.mailing_ids = sorted(dispatch.dispatch_due())
        assert len(self.mailing_ids) == 2
        self.delivery_ids = list(
            Delivery.objects.filter(mailing_id__in=self.mailing_ids).values_list("pk", flat=True)
        )
        assert len(self.delivery_ids) == 8
        self.workers: list[list[Hand]] = [[] for _ in WORKERS]
        self.cancelled = False
        self.seen: dict[int, tuple[int, int]] = {}  # delivery id -> (attempt, tries)

    # --- helpers ---------------------------------------------------------------------------

    def rows(self) -> dict[int, Delivery]:
        return {d.pk: d for d in Delivery.objects.filter(mailing_id__in=self.mailing_ids)}

    def accepted(self) -> list:
        ids = set(self.delivery_ids)
        return [a for a in list(self.smtp.accepted) if a.delivery_id in ids]

    def accepted_count(self, delivery_id: int) -> int:
        return sum(1 for a in self.accepted() if a.delivery_id == delivery_id)

    def hands_in(self, *stages: str) -> list[Hand]:
        return [h for batch in self.workers for h in batch if h.stage in stages]

    def may_still_send(self, delivery_id: int) -> bool:
        return any(h.claim.id == delivery_id for h in self.hands_in(STARTED))

    def send(self, hand: Hand, reply: str) -> SendResult:
        """Send the hand's email the way batch_send does, over a fresh connection."""
        behaviour, expected = REPLIES[reply]
        self.smtp.handler.behaviour = Behaviour(**behaviour.__dict__)
        timeout = STALL_TIMEOUT if behaviour.stall else settings.EMAIL_TIMEOUT
        backend = get_connection(fail_silently=False, timeout=timeout)
        email = compose.Composer([hand.claim]).email_for(
            hand.claim, raw_ok=isinstance(backend, SMTPBackend)
        )
        try:
            result = send_one(connection=backend, message=email)
        finally:
            backend.close()
            self.tracker.wait_idle()
            self.smtp.handler.behaviour = Behaviour()
        assert result.outcome is expected, (reply, result)
        return result

    def expected_record(self, hand: Hand, row: Delivery, outcome: Outcome) -> str | None:
        """What delivery_record must do, given the row as it stood before the call."""
        # A definite answer (250, 4xx, 5xx) for the same attempt also settles an ``unknown``
        # row: the sweeper gave up on a worker that was only slow.
        allowed_from = {S.SUBMITTING} if outcome is Outcome.UNKNOWN else {S.SUBMITTING, S.UNKNOWN}
        if row.attempt != hand.claim.attempt or row.status not in allowed_from:
            return None
        if outcome is Outcome.ACCEPTED:
            return S.SENT
        if outcome is Outcome.RETRY:
            return S.RETRY_WAIT if hand.claim.tries + 1 < MAX_ATTEMPTS else S.FAILED
        return {Outcome.FAILED: S.FAILED, Outcome.UNKNOWN: S.UNKNOWN}[outcome]

    def record(self, hand: Hand, result: SendResult) -> None:
        row = Delivery.objects.get(pk=hand.claim.id)
        expected = self.expected_record(hand, row, result.outcome)
        got = transitions.delivery_record(claimed=hand.claim, result=result)
        assert got == expected, (hand, row.status, row.attempt, result.outcome, got)

    # --- the one rule ------------------------------------------------------------------------
    # As separate Hypothesis rules, the operations below met too rarely: Hypothesis switches
    # rules off per example (swarm testing) and its choice among the rest drifts, so a worker
    # seldom got through claim, start, send and record while a cancel or a sweep came between.
    # One rule draws from OPS instead, where the listing of each operation sets its weight.

    @rule(op=st.sampled_from(OPS))
    def step(self, op: tuple) -> None:
        self.clean = False
        name, *args = op
        getattr(self, name)(*args)
        self.clean = True

    # --- workers ---------------------------------------------------------------------------

    def worker(self, slot: int, action: str) -> None:
        """Worker ``slot`` takes the next step through its batch, or dies (``crash``).

        No batch: claim one. Batch head claimed: start it. Started: send it, the server
        answering ``action``. Sent: record the answer, which is a late confirmation (or late
        refusal) if the sweeper has meanwhile made the row unknown. A crash drops the whole
        batch, recording nothing: a SIGKILL before or after the server's answer.
        """
        batch = self.workers[slot]
        hand = batch[0] if batch else None
        if action == "crash":
            batch.clear()
        elif hand is None:
            which, k = WORKERS[slot]
            batch.extend(self.claim(which, k))
        elif hand.stage == CLAIMED:
            self.start(batch)
        elif hand.stage == STARTED:
            # The row may have moved on meanwhile (swept to ``unknown``): the worker cannot
            # know, sends anyway, and the fenced record decides.
            hand.result = self.send(hand, action)
            hand.stage = SENT
        else:
            self.record(hand, hand.result)
            batch.pop(0)

    def claim(self, which: int | None, k: int) -> list[Hand]:
        """Claim up to k rows of one mailing, or of any (mailing_id=None), as the model says."""
        scope = self.mailing_ids if which is None else [self.mailing_ids[which]]
        due = (
            Delivery.objects.filter(mailing_id__in=scope, status__in=[S.PENDING, S.RETRY_WAIT])
            .filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=timezone.now()))
            .order_by("pk")
            .values_list("pk", "mailing_id")
        )
        expected = [pk for pk, m in due if selectors.sending_allowed(mailing_id=m)][:k]
        mailing_id = None if which is None else self.mailing_ids[which]
        claims = transitions.deliveries_claim(limit=k, mailing_id=mailing_id)
        assert [c.id for c in claims] == expected
        for c in claims:
            before = self.seen.get(c.id, (0, 0))[0]
            assert c.attempt > before, f"claim of {c.id} reused fencing token {c.attempt}"
        return [Hand(c, CLAIMED) for c in claims]

    def start(self, batch: list[Hand]) -> None:
        """claimed -> submitting; it must succeed exactly when the hand still owns the row.

        On failure the worker does what batch_send does: if sending is no longer allowed it
        hands the rest of its batch back and stops, otherwise it skips the lost row.
        """
        hand = batch[0]
        row = Delivery.objects.get(pk=hand.claim.id)
        owns = row.status == S.CLAIMED and row.attempt == hand.claim.attempt
        allowed = selectors.sending_allowed(mailing_id=row.mailing_id)
        assert transitions.delivery_start(claimed=hand.claim) == (owns and allowed), (
            hand,
            row.status,
        )
        if owns and allowed:
            hand.stage = STARTED
            row.refresh_from_db()
            assert row.tries == hand.claim.tries + 1
            assert row.message_id_header == message_id_for(row.pk)
        elif allowed:
            batch.pop(0)
        else:
            transitions.claims_release(claims=[h.claim for h in batch])
            batch.clear()

    def batch(self, which: int | None, reply: str) -> None:
        """A real batch_send of one delivery, the server answering ``reply``."""
        behaviour, _ = REPLIES[reply]
        self.smtp.handler.behaviour = Behaviour(**behaviour.__dict__)
        timeout = STALL_TIMEOUT if behaviour.stall else settings.EMAIL_TIMEOUT
        try:
            with override_settings(EMAIL_TIMEOUT=timeout):
                batch.batch_send(
                    mailing_id=None if which is None else self.mailing_ids[which], limit=1
                )
        finally:
            self.tracker.wait_idle()
            self.smtp.handler.behaviour = Behaviour()

    # --- time, the sweeper, staff ----------------------------------------------------------

    def sweep(self, after: str) -> None:
        """The sweeper runs, on its own or once time has passed: leases ran out, retries due.

        The claim step of a worker already sees time having passed, sweep or no sweep.
        """
        if after != "nothing":
            past = timezone.now() - dt.timedelta(seconds=1)
            rows = Delivery.objects.filter(
                mailing_id__in=self.mailing_ids, status__in=RUN_OUT[after]
            )
            if after == "retries due":
                rows.update(next_attempt_at=past)
            else:
                rows.update(lease_until=past)
        sweep.sweep()

    def staff(self, action: str, i: int) -> None:
        """Ops flip the global switch; staff pause/resume or cancel a message.

        Staff act on the message of a held hand when there is one, so that their action meets
        work in flight. A message is cancelled at most once per example: a cancel ends most of
        the interesting work on its mailing.
        """
        hands = self.hands_in(CLAIMED, STARTED, SENT)
        if hands:
            which = self.mailing_ids.index(hands[i % len(hands)].claim.mailing_id)
        else:
            which = i % len(self.sources)
        source = self.sources[which]
        source.refresh_from_db()
        if action in ("pause all", "resume all"):
            controls.sending_set_paused(paused=action == "pause all", actor="hypothesis")
        elif action == "toggle pause" and source.status == SendStatus.SENDING:
            message_pause(message=source)
        elif action == "toggle pause" and source.status == SendStatus.PAUSED:
            message_resume(message=source)
        elif action == "cancel" and not self.cancelled:
            self.cancelled = True
            if source.status in (SendStatus.SENDING, SendStatus.PAUSED):
                message_cancel(message=source)
                rows = Delivery.objects.filter(mailing_id=self.mailing_ids[which])
                assert not rows.filter(status__in=[S.PENDING, S.CLAIMED, S.RETRY_WAIT]).exists()
            else:
                with pytest.raises(ValidationError):
                    message_cancel(message=source)

    def resolvable(self) -> list[int]:
        """Unknown rows that no living worker could still send."""
        unknown = (
            Delivery.objects.filter(mailing_id__in=self.mailing_ids, status=S.UNKNOWN)
            .order_by("pk")
            .values_list("pk", flat=True)
        )
        return [pk for pk in unknown if not self.may_still_send(pk)]

    def resolve_unknown(self, i: int, resend: bool) -> None:
        """A person settles an ``unknown`` row, by the server's record, once no worker lives.

        ``resend`` is chosen only for a row the server never accepted: the person knows (from
        the provider's logs, say) that it did not arrive.
        """
        candidates = self.resolvable()
        if not candidates:
            return
        pk = candidates[i % len(candidates)]
        if self.accepted_count(pk) > 0:
            resolution = controls.Resolution.SENT
        else:
            resolution = controls.Resolution.RESEND if resend else controls.Resolution.FAILED
        moved = controls.unknowns_resolve(
            delivery_ids=[pk], resolution=resolution, actor="ops@hypothesis"
        )
        assert moved == 1

    # --- invariants --------------------------------------------------------------------------

    @invariant()
    def exactly_once_so_far(self) -> None:
        """The safety half of the promise holds after every step, not only at the end."""
        self.clean = False
        rows = self.rows()
        ours = self.accepted()
        per_pair = Counter((rows[a.delivery_id].mailing_id, a.rcpt) for a in ours)
        dupes = {pair: n for pair, n in per_pair.items() if n > 1}
        assert not dupes, f"accepted more than once: {dupes}"
        per_delivery = Counter(a.delivery_id for a in ours)
        for a in ours:
            assert a.message_id == message_id_for(a.delivery_id)
        for pk, d in rows.items():
            n = per_delivery.get(pk, 0)
            if d.status == S.SENT:
                assert n == 1, f"sent delivery {pk} matched {n} accepted messages"
                assert d.sent_at is not None
            elif d.status in NEVER_ACCEPTED:
                assert n == 0, f"{d.status} delivery {pk} was accepted {n} times"
            else:
                assert n <= 1, f"{d.status} delivery {pk} was accepted {n} times"
            # The duplicate check counts acceptances on the row: exactly one on each sent row.
            assert d.accepted == (d.status == S.SENT), (pk, d.status, d.accepted)
            # No claim cycle without end: every claim of a row led to a start (a try, bounded
            # by MAX_ATTEMPTS), lapsed with its worker (bounded by MAX_LOST_CLAIMS, then the
            # row fails), was given back by a batch that stopped (a pause), or ended the row.
            assert d.tries <= MAX_ATTEMPTS, (pk, d.tries)
            assert d.lost_claims <= MAX_LOST_CLAIMS, (pk, d.lost_claims)
            if d.lost_claims == MAX_LOST_CLAIMS and d.status != S.CLAIMED:
                assert d.status == S.FAILED, (pk, d.status, d.lost_claims)
            offered = RELEASES_OFFERED[pk]
            assert d.attempt <= d.tries + d.lost_claims + offered + 1, (pk, d.attempt, offered)
            attempt, tries = self.seen.get(pk, (0, 0))
            assert d.attempt >= attempt, f"fencing token of {pk} went back: {attempt}->{d.attempt}"
            assert d.tries >= tries, f"tries of {pk} went back: {tries}->{d.tries}"
            self.seen[pk] = (d.attempt, d.tries)
        self.clean = True

    # --- the end -----------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            if self.clean:
                self.settle()
        finally:
            factories.empty_app_tables()

    def settle(self) -> None:
        """Every worker dies; ops resume everything; sweeps and behaving batches drain the rest.

        Then the liveness half of the promise: every row terminal, every mailing finished,
        and the exactly-once check of tests/invariants.py.
        """
        for held in self.workers:
            held.clear()
        self.smtp.handler.behaviour = Behaviour()
        controls.sending_set_paused(paused=False, actor="hypothesis")
        for source in self.sources:
            source.refresh_from_db()
            if source.status == SendStatus.PAUSED:
                message_resume(message=source)
        for _ in range(MAX_ATTEMPTS + 2):
            Delivery.objects.filter(
                mailing_id__in=self.mailing_ids, status__in=[S.CLAIMED, S.SUBMITTING]
            ).update(lease_until=timezone.now() - dt.timedelta(seconds=1))
            Delivery.objects.filter(mailing_id__in=self.mailing_ids, status=S.RETRY_WAIT).update(
                next_attempt_at=timezone.now() - dt.timedelta(seconds=1)
            )
            sweep.sweep()
            while batch.batch_send(limit=50).claimed:
                pass
            sweep.sweep()
            if all(d.status in TERMINAL_STATUSES for d in self.rows().values()):
                break
        stuck = {pk: d.status for pk, d in self.rows().items() if d.status not in TERMINAL_STATUSES}
        assert not stuck, f"rows never settled: {stuck}"
        assert_exactly_once(self.smtp.accepted, mailing_ids=self.mailing_ids)
        self.exactly_once_so_far()
        mailings = dict(Mailing.objects.filter(pk__in=self.mailing_ids).values_list("pk", "status"))
        for source, mailing_id in zip(self.sources, self.mailing_ids, strict=True):
            source.refresh_from_db()
            status = mailings[mailing_id]
            assert status in (Mailing.Status.COMPLETED, Mailing.Status.CANCELLED), status
            expected = (
                SendStatus.SENT if status == Mailing.Status.COMPLETED else SendStatus.CANCELLED
            )
            assert source.status == expected, (mailing_id, status, source.status)


@pytest.mark.timeout(900)  # a failure is shrunk for up to five minutes
@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_delivery_state_machine(smtp, settings, redis_client, monkeypatch):
    """Run the machine; each example gets empty tables, its own school and two mailings."""
    settings.EMAIL_TIMEOUT = 10  # generous: no ordinary send may time out on a busy machine
    settings.EDSMART_MAX_ATTEMPTS = MAX_ATTEMPTS
    settings.EDSMART_RETRY_BASE_SECONDS = 60
    settings.EDSMART_UNKNOWN_POLICY = "hold"
    tracker = DataTracker(smtp.handler)
    monkeypatch.setattr(smtp.handler, "handle_DATA", tracker.handle_DATA, raising=False)
    # Nudges are only hints (DESIGN.md): publishing Celery messages that no worker consumes
    # would cost a third of the run and fill Redis, and changes nothing this test checks.
    monkeypatch.setattr(nudges, "enqueue_batches", lambda *args, **kwargs: 0)
    settings.EDSMART_MAX_LOST_CLAIMS = MAX_LOST_CLAIMS
    real_release = transitions.claims_release

    def counting_release(*, claims, **kwargs):
        claims = list(claims)
        RELEASES_OFFERED.update(c.id for c in claims)
        return real_release(claims=claims, **kwargs)

    monkeypatch.setattr(transitions, "claims_release", counting_release)
    monkeypatch.setattr(DeliveryMachine, "smtp", smtp)
    monkeypatch.setattr(DeliveryMachine, "tracker", tracker)
    assert not SendingSwitch.objects.filter(paused=True).exists()
    run_state_machine_as_test(DeliveryMachine, settings=hypothesis_settings.get_profile(PROFILE))


# --- interleavings the machine found, as plain step-by-step tests ------------------------------


def _one_delivery_in_flight(school) -> tuple[Broadcast, transitions.Claimed]:
    factories.make_family(school=school)
    source = factories.make_broadcast(school=school)
    message_schedule(message=source, send_at=timezone.now())
    dispatch.dispatch_due()
    [claimed] = transitions.deliveries_claim(limit=1)
    assert transitions.delivery_start(claimed=claimed)
    return source, claimed


def _settle_and_assert_terminal() -> None:
    for _ in range(MAX_ATTEMPTS + 2):
        Delivery.objects.filter(status=S.RETRY_WAIT).update(
            next_attempt_at=timezone.now() - dt.timedelta(seconds=1)
        )
        sweep.sweep()
        batch.batch_send()
    stuck = dict(Delivery.objects.exclude(status__in=TERMINAL_STATUSES).values_list("pk", "status"))
    assert not stuck, f"rows never settled: {stuck}"


@pytest.mark.django_db(transaction=True)
def test_4xx_for_a_send_in_flight_when_its_message_is_cancelled_settles(
    school, smtp, settings, redis_client
):
    """cancel skips ``submitting`` rows; a 4xx then makes them retry_wait in a dead mailing."""
    settings.EDSMART_MAX_ATTEMPTS = MAX_ATTEMPTS
    source, claimed = _one_delivery_in_flight(school)
    message_cancel(message=source)
    refused = SendResult(Outcome.RETRY, "RCPT TO refused: 450 4.2.0 Mailbox busy")
    transitions.delivery_record(claimed=claimed, result=refused)
    _settle_and_assert_terminal()
    assert not smtp.accepted


@pytest.mark.django_db(transaction=True)
def test_late_4xx_after_the_mailing_completed_on_unknown_settles(
    school, smtp, settings, redis_client
):
    """The sweeper makes the slow send unknown, the mailing completes, then its 4xx arrives."""
    settings.EDSMART_MAX_ATTEMPTS = MAX_ATTEMPTS
    _, claimed = _one_delivery_in_flight(school)
    Delivery.objects.update(lease_until=timezone.now() - dt.timedelta(seconds=1))
    sweep.sweep()
    assert Mailing.objects.get().status == Mailing.Status.COMPLETED
    refused = SendResult(Outcome.RETRY, "RCPT TO refused: 450 4.2.0 Mailbox busy")
    assert transitions.delivery_record(claimed=claimed, result=refused) == S.RETRY_WAIT
    _settle_and_assert_terminal()
    assert_exactly_once(smtp.accepted)
