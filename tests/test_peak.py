"""Peak hour (project issue 11): the shared send rate, throttling back-off, fair share across
schools and the urgent lane.

The order and pacing rules are checked twice: on the Redis scripts directly (fast, exact), and
with real Celery worker processes sending to the test SMTP server, where the claims are order
facts read off the server's acceptance list (which school's email came before which), not
timings. How fast each lane finishes is the peak bench's job (bench/peak.py).
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Iterator

import pytest
from django.utils import timezone

from notifications import dispatch, fairshare, ratelimit
from notifications.models import Delivery, DeliveryStatus, Mailing
from slips.models import Audience, Broadcast, Guardian, School, Slip, Student
from slips.services import message_schedule
from tests import factories
from tests.invariants import assert_exactly_once
from tests.processes import Processes, private_stack, wait_until
from tests.smtp_server import Accepted, SMTPServer

S = DeliveryStatus
BATCH_SENT = re.compile(
    r"send_batch\[[^\]]+\] succeeded in [\d.]+s: \{'claimed': \d+, 'sent': (\d+)"
)


# --- the turns, on Redis directly ----------------------------------------------------------------


def _turns(n: int) -> list[tuple[int, bool]]:
    out = []
    for _ in range(n):
        turn = fairshare.next_turn()
        out.append((turn.mailing_id, turn.urgent) if turn else (0, False))
    return out


def test_schools_take_turns_then_their_mailings(redis_client):
    # School 1 has three mailings, school 2 one: school 2 is not made to wait behind three.
    for mailing in (11, 12, 13):
        fairshare.activate(mailing_id=mailing, school_id=1, urgent=False)
    fairshare.activate(mailing_id=21, school_id=2, urgent=False)
    order = [m for m, _ in _turns(8)]
    school_of = {11: 1, 12: 1, 13: 1, 21: 2}
    assert [school_of[m] for m in order] in ([1, 2] * 4, [2, 1] * 4)
    # Within school 1 its mailings rotate.
    assert [m for m in order if school_of[m] == 1] == [11, 12, 13, 11]


def test_a_newcomer_starts_level_with_the_least_served(redis_client):
    fairshare.activate(mailing_id=11, school_id=1, urgent=False)
    _turns(50)  # school 1 alone for a while
    fairshare.activate(mailing_id=21, school_id=2, urgent=False)
    order = [m for m, _ in _turns(6)]
    # Not 50 turns in a row for the newcomer (replaying school 1's history), nor a wait.
    assert order.count(21) == 3 and order.count(11) == 3


def test_urgent_goes_first_and_finished_mailings_leave(redis_client):
    fairshare.activate(mailing_id=11, school_id=1, urgent=False)
    fairshare.activate(mailing_id=31, school_id=3, urgent=True)
    assert _turns(3) == [(31, True)] * 3
    fairshare.finished(fairshare.Turn(mailing_id=31, school_id=3, urgent=True))
    assert _turns(2) == [(11, False)] * 2
    fairshare.finished(fairshare.Turn(mailing_id=11, school_id=1, urgent=False))
    assert fairshare.next_turn() is None
    assert fairshare.queue() == fairshare.Queue(urgent=0, schools=0)


def test_activating_twice_keeps_the_place(redis_client):
    fairshare.activate(mailing_id=11, school_id=1, urgent=False)
    fairshare.activate(mailing_id=12, school_id=1, urgent=False)
    _turns(4)
    fairshare.activate(mailing_id=11, school_id=1, urgent=False)  # a sweep lists it again
    assert [m for m, _ in _turns(4)] == [11, 12, 11, 12]


# --- the shared rate, on Redis directly ----------------------------------------------------------


def test_slots_are_spaced_one_interval_apart_and_never_far_ahead(redis_client, settings):
    settings.EDSMART_SEND_RATE = 20  # 50 ms apart
    waits = []
    for _ in range(8):
        ok, wait, rate = ratelimit._call("reserve", ratelimit.RESERVE_AHEAD)
        waits.append((ok, round(wait, 2)))
        assert rate == 20
    granted = [w for ok, w in waits if ok]
    # 0, 0.05, 0.10, ... up to RESERVE_AHEAD; after that nothing is handed out.
    assert granted == pytest.approx([0.05 * i for i in range(len(granted))], abs=0.02)
    assert 5 <= len(granted) <= 6
    assert all(not ok for ok, _ in waits[len(granted) :])


def test_a_throttle_halves_the_rate_once_then_it_climbs_back(redis_client, settings):
    settings.EDSMART_SEND_RATE = 40
    settings.EDSMART_SEND_RATE_RECOVERY_SECONDS = 1
    assert ratelimit.state().effective == 40
    assert ratelimit.backoff(detail="451 slow down") == 20
    ratelimit.backoff(detail="451 again, same burst")  # within a second: one signal
    state = ratelimit.state()
    assert state.backed_off and state.effective == pytest.approx(20, abs=2)
    assert state.throttles == 2
    time.sleep(1.1)
    state = ratelimit.state()
    assert not state.backed_off and state.effective == 40


def test_with_no_cap_a_throttle_engages_a_limit_from_the_observed_rate(redis_client, settings):
    settings.EDSMART_SEND_RATE = 0
    settings.EDSMART_SEND_RATE_RECOVERY_SECONDS = 60
    assert ratelimit.note_sent(100) is False  # no limit in force
    time.sleep(1.0)
    assert ratelimit.note_sent(100) is False  # about 200 emails/s observed
    halved = ratelimit.backoff(detail="421 too fast")
    assert 50 < halved < 150
    assert ratelimit.note_sent(10) is True  # batches now take slots
    assert ratelimit.state().effective == pytest.approx(halved, rel=0.1)


def test_redis_away_means_waiting_not_sending(settings):
    settings.EDSMART_SEND_RATE = 10
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(ratelimit.RateWaitTimeout):
        ratelimit.acquire(deadline=time.monotonic() + 1.2)
    assert time.monotonic() - start >= 0.9


# --- dispatch: most pressing first, one dispatcher at a time ------------------------------------


@pytest.mark.django_db
def test_dispatch_takes_urgent_then_slips_then_broadcasts(school, redis_client):
    audience = factories.make_audience(school=school)
    factories.make_family(school=school)
    earlier = timezone.now() - dt.timedelta(minutes=5)
    plain = factories.make_broadcast(school=school, audience=audience)
    slip = factories.make_slip(school=school, audience=audience)
    urgent = factories.make_broadcast(school=school, audience=audience, urgent=True)
    for message in (plain, slip, urgent):
        message_schedule(message=message, send_at=timezone.now())
    Broadcast.objects.filter(pk=plain.pk).update(send_at=earlier)  # due first, still last
    created = dispatch.dispatch_due()
    sources = [Mailing.objects.get(pk=pk) for pk in created]
    assert [(m.broadcast_id, m.slip_id) for m in sources] == [
        (urgent.pk, None),
        (None, slip.pk),
        (plain.pk, None),
    ]
    assert sources[0].urgent and not sources[2].urgent


@pytest.mark.django_db
def test_large_fan_outs_take_turns_and_small_ones_do_not_wait(school, redis_client, monkeypatch):
    monkeypatch.setattr(dispatch, "QUICK_FAN_OUT", 2)
    for _ in range(3):
        factories.make_family(school=school)
    audience = factories.make_audience(school=school)  # 3 students: "large" here
    small_audience = factories.make_audience(
        school=school, whole_school=False, students=list(school.students.all()[:1])
    )
    big = factories.make_broadcast(school=school, audience=audience)
    small = factories.make_slip(school=school, audience=small_audience)
    for message in (big, small):
        message_schedule(message=message, send_at=timezone.now())
    running = redis_client.lock(dispatch.DISPATCH_LOCK, timeout=5)
    assert running.acquire(blocking=False)  # another pass is fanning out a large message
    [created] = dispatch.dispatch_due()
    assert Mailing.objects.get(pk=created).slip_id == small.pk
    assert not Mailing.objects.filter(broadcast=big).exists()
    running.release()
    [created] = dispatch.dispatch_due()
    assert Mailing.objects.get(pk=created).broadcast_id == big.pk
    assert not redis_client.exists(dispatch.DISPATCH_LOCK)  # released at the end of the pass


# --- real workers --------------------------------------------------------------------------------


@pytest.fixture
def rig(transactional_db, settings, monkeypatch, smtp_session) -> Iterator[tuple]:
    """A private Redis (broker and coordination), the test SMTP server, worker processes."""
    with private_stack(
        prefix="edsmart-peak-",
        settings=settings,
        monkeypatch=monkeypatch,
        smtp=smtp_session,
        secret_key="peak-tests-secret-key-not-used-anywhere-else-0123456789",
        env={"EDSMART_BATCH_SIZE": "20"},
    ) as (private, procs, _env):
        yield private, procs, smtp_session


def _families(school: School, n: int, *, tag: str) -> Audience:
    """``n`` one-guardian families in bulk (thousands of ORM saves would take the test's time)."""
    students = Student.objects.bulk_create(
        [Student(school=school, first_name=f"K{i}", last_name=tag) for i in range(n)]
    )
    guardians = Guardian.objects.bulk_create(
        [
            Guardian(
                school=school,
                name=f"P{i}",
                email=f"{tag}{i}@example.org",
                email_normalized=f"{tag}{i}@example.org",
            )
            for i in range(n)
        ]
    )
    link = Guardian.students.through
    link.objects.bulk_create(
        [link(guardian_id=g.pk, student_id=s.pk) for g, s in zip(guardians, students, strict=True)]
    )
    return factories.make_audience(school=school)


def _due_now(message: Slip | Broadcast) -> list[int]:
    """Make ``message`` due and dispatch it; returns its mailing's id (in a list). A worker's
    batch may be the dispatcher that takes it (one dispatcher at a time), so this waits for
    the mailing rather than trusting this call's own result."""
    message_schedule(message=message, send_at=timezone.now())
    dispatch.dispatch_due()
    source = {"slip": message} if isinstance(message, Slip) else {"broadcast": message}
    return [
        wait_until(
            lambda: Mailing.objects.filter(**source).values_list("pk", flat=True).first(),
            timeout=30,
            message=f"{message} dispatched",
        )
    ]


def _all_sent(smtp: SMTPServer, total: int, procs: Processes, timeout: float = 90) -> None:
    wait_until(
        lambda: Delivery.objects.filter(status=S.SENT).count() == total,
        timeout=timeout,
        message=f"{total} deliveries sent",
        diagnostics=lambda: f"{len(smtp.accepted)} accepted\n{procs.tails()}",
    )


def _busiest_second(accepted: list[Accepted]) -> int:
    times = sorted(a.at for a in accepted)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= 1.0:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


@pytest.mark.workers
def test_two_workers_share_one_rate(rig, settings):
    _redis, procs, smtp = rig
    cap = 40
    school = factories.make_school(slug="capped")
    audience = _families(school, 200, tag="cap")
    env = {"EDSMART_SEND_RATE": str(cap), "EDSMART_BATCH_PARALLELISM": "4"}
    first = procs.worker("first", concurrency=2, env=env)
    second = procs.worker("second", concurrency=2, env=env)
    _due_now(factories.make_broadcast(school=school, audience=audience))
    _all_sent(smtp, 200, procs)
    assert_exactly_once(smtp.accepted)
    busiest = _busiest_second(smtp.accepted)
    assert busiest <= cap * 1.1, f"{busiest} emails in one second under a cap of {cap}"
    # Both worker instances sent (one shared bucket, not one each). A batch logs its result
    # when it ends, which can be a moment after the last email was accepted.
    for proc in (first, second):
        wait_until(
            lambda p=proc: sum(int(n) for n in BATCH_SENT.findall(p.log())) > 0,
            timeout=30,
            message="a send batch of each worker reporting its sends",
            diagnostics=proc.tail,
        )


@pytest.mark.workers
def test_throttling_is_not_charged_and_backs_the_shared_rate_off(rig, settings, client):
    _redis, procs, smtp = rig
    settings.EDSMART_SEND_RATE = 40
    settings.EDSMART_SEND_RATE_RECOVERY_SECONDS = 120
    school = factories.make_school(slug="throttled")
    audience = _families(school, 30, tag="thr")
    smtp.behaviour.throttle_first = 3
    procs.worker(
        "w",
        concurrency=1,
        env={"EDSMART_SEND_RATE": "40", "EDSMART_SEND_RATE_RECOVERY_SECONDS": "120"},
    )
    _due_now(factories.make_broadcast(school=school, audience=audience))
    _all_sent(smtp, 30, procs)
    assert_exactly_once(smtp.accepted)
    throttled = Delivery.objects.filter(throttles__gt=0)
    assert throttled.count() == 3
    # Sent on the try after the throttle, which was not charged.
    assert set(throttled.values_list("tries", flat=True)) == {1}
    state = ratelimit.state()
    assert state.backed_off and state.effective < 40 and state.throttles == 3
    settings.EDSMART_METRICS_TOKEN = "peak-metrics-token-0123456789"
    body = client.get(
        "/metrics", secure=True, HTTP_AUTHORIZATION="Bearer peak-metrics-token-0123456789"
    ).content.decode()
    effective = next(
        float(line.split()[-1])
        for line in body.splitlines()
        if line.startswith("edsmart_send_rate_effective ")
    )
    assert 15 <= effective < 40


@pytest.mark.workers
def test_with_redis_away_a_capped_fleet_waits_then_sends_each_once(rig, settings):
    """The bucket lives in Redis: while it is unreachable nothing is sent (an email already
    past its slot may finish), and when Redis is back (empty) everything goes out once."""
    redis_server, procs, smtp = rig
    school = factories.make_school(slug="outage")
    audience = _families(school, 150, tag="out")
    env = {"EDSMART_SEND_RATE": "30", "EDSMART_SWEEP_INTERVAL_SECONDS": "1"}
    procs.worker("w", concurrency=1, env=env)
    procs.beat("beat", env=env)
    _due_now(factories.make_broadcast(school=school, audience=audience))
    wait_until(lambda: len(smtp.accepted) >= 20, timeout=60, message="sending under the cap")
    redis_server.stop()
    time.sleep(0.5)  # an email that had its slot finishes
    during = len(smtp.accepted)
    time.sleep(3)
    assert len(smtp.accepted) == during, "sent while the shared rate was unreachable"
    redis_server.start()
    _all_sent(smtp, 150, procs, timeout=120)
    assert_exactly_once(smtp.accepted)
    assert _busiest_second(smtp.accepted) <= 30 * 1.1


def _positions(accepted: list[Accepted], mailing_id: int) -> list[int]:
    ids = set(Delivery.objects.filter(mailing_id=mailing_id).values_list("pk", flat=True))
    return [i for i, a in enumerate(accepted) if a.delivery_id in ids]


@pytest.mark.workers
def test_a_small_school_is_not_held_behind_a_big_one(rig, settings):
    _redis, procs, smtp = rig
    big = factories.make_school(slug="big")
    big_audience = _families(big, 200, tag="big")
    small = factories.make_school(slug="small")
    small_audience = _families(small, 40, tag="small")
    procs.worker("w", concurrency=1, env={"EDSMART_BATCH_PARALLELISM": "1"})
    for _ in range(3):
        _due_now(factories.make_broadcast(school=big, audience=big_audience))
    wait_until(lambda: len(smtp.accepted) >= 60, timeout=60, message="the big school sending")
    [slip_mailing] = _due_now(factories.make_slip(school=small, audience=small_audience))
    due_at = len(smtp.accepted)
    _all_sent(smtp, 640, procs)
    accepted = list(smtp.accepted)
    assert_exactly_once(accepted)
    small_positions = _positions(accepted, slip_mailing)
    big_between = small_positions[-1] - due_at + 1 - len(small_positions)
    # First come first served would put all ~540 remaining big emails first. By turns: the
    # chunk in flight, then alternate chunks of 20: the 40 families are done within a few.
    assert big_between <= 4 * 20, (due_at, small_positions)
    assert Mailing.objects.get(pk=slip_mailing).recipient_count == 40


@pytest.mark.workers
def test_busy_batches_pick_up_due_messages_themselves(rig, settings):
    """Every pool process busy sending (and no beat at all): a slip that falls due is still
    dispatched and sent before the bulk ends, by a batch between its turns."""
    _redis, procs, smtp = rig
    bulk = factories.make_school(slug="busy")
    bulk_audience = _families(bulk, 300, tag="busy")
    small = factories.make_school(slug="waiting")
    small_audience = _families(small, 10, tag="wait")
    procs.worker("w", concurrency=1, env={"EDSMART_SEND_RATE": "40"})
    _due_now(factories.make_broadcast(school=bulk, audience=bulk_audience))
    wait_until(lambda: len(smtp.accepted) >= 20, timeout=60, message="the bulk sending")
    slip = factories.make_slip(school=small, audience=small_audience)
    message_schedule(message=slip, send_at=timezone.now())  # no dispatch_due from here
    _all_sent(smtp, 310, procs)
    accepted = list(smtp.accepted)
    [mailing_id] = Mailing.objects.filter(slip=slip).values_list("pk", flat=True)
    positions = _positions(accepted, mailing_id)
    assert len(positions) == 10 and positions[-1] < 200, positions


@pytest.mark.workers
def test_urgent_goes_ahead_of_everything(rig, settings):
    _redis, procs, smtp = rig
    bulk = factories.make_school(slug="bulk")
    bulk_audience = _families(bulk, 400, tag="bulk")
    other = factories.make_school(slug="closure")
    other_audience = _families(other, 60, tag="closed")
    procs.worker("w", concurrency=1, env={"EDSMART_BATCH_PARALLELISM": "1"})
    _due_now(factories.make_broadcast(school=bulk, audience=bulk_audience))
    _due_now(factories.make_slip(school=other, audience=other_audience))
    wait_until(lambda: len(smtp.accepted) >= 60, timeout=60, message="the bulk sending")
    urgent = factories.make_broadcast(school=other, audience=other_audience, urgent=True)
    [urgent_mailing] = _due_now(urgent)
    assert Mailing.objects.get(pk=urgent_mailing).urgent
    due_at = len(smtp.accepted)
    _all_sent(smtp, 520, procs)
    accepted = list(smtp.accepted)
    assert_exactly_once(accepted)
    positions = _positions(accepted, urgent_mailing)
    # At most the chunk in flight went before it; once started, nothing normal in between.
    assert positions[0] - due_at <= 20, (due_at, positions[:3])
    assert positions[-1] - positions[0] == len(positions) - 1 == 59


def test_duties_between_turns_swallow_failures_but_not_a_soft_time_limit(redis_client, monkeypatch):
    from celery.exceptions import SoftTimeLimitExceeded

    from notifications import tasks

    def broken() -> list[int]:
        raise RuntimeError("dispatch broke")

    monkeypatch.setattr(dispatch, "dispatch_due", broken)
    monkeypatch.setattr(tasks.sweep, "sweep", lambda: None)
    tasks.periodic_duties()  # logged; the batch goes on sending

    def stopped() -> list[int]:
        raise SoftTimeLimitExceeded()

    redis_client.flushdb()  # the dispatch duty's period starts again
    monkeypatch.setattr(dispatch, "dispatch_due", stopped)
    with pytest.raises(SoftTimeLimitExceeded):
        tasks.periodic_duties()
