"""Predict the peak bench's completion time from measured per-email costs, and check it.

    .venv/bin/python bench/peak_model.py --capacity CAPACITY.json [--config direct]
        [--rate 0] [--scale 1] [--seed 1] [--cores N] [--peak-report PEAK.txt]

Why: docs/scaling.md sizes fleets from what one email costs (bench/capacity.py). A capacity
model is only worth planning with if it predicts a run it was not fitted to; this one predicts
bench/peak.py (204,150 emails from 21 schools through two worker instances and one beat on one
machine) from a 10,000-email broadcast's costs.

The model, for one machine that runs everything (workers, beat, PostgreSQL, Redis, the sink),
is the bottleneck law of a closed system (operational analysis), from capacity.py's figures:

- demand: every email costs ``D`` CPU-milliseconds in total (worker, beat, PostgreSQL, Redis,
  sink; dispatch and fan-out included), and the roles cost ``i`` CPU-milliseconds per second
  while idle (beat's ticks, the workers' polls);
- the cores bound: ``cores`` can serve at most ``(cores x 1000 - i) / D`` emails/s;
- the processes bound: one worker process has one email in flight, and everything that email
  needs (its composing and sending, its statement in PostgreSQL, the sink reading it) happens
  in turn, so ``P`` processes (peak.py: two instances of ``--concurrency 2``, P = 4) send at
  most ``P x 1000 / D`` emails/s;
- the rate ``X`` is the smaller of the two, and of ``EDSMART_SEND_RATE`` when set (the cap's
  own efficiency, 0.97 at the sink, is not modelled). The messages fall due within the first
  ten seconds while the bulk is sending, so the machine stays saturated to the last email:
  completion = ``d + N / X``, ``d`` being the time from due to dispatched (fan-out done) that
  capacity.py measured.

It is a bound (no queueing loss), and it says so: with P = 2 x cores the cores bound applies,
and it predicts a machine kept fully busy. The share the capacity run itself kept busy, ``U``,
is printed next to it as a check (a prediction with ``X = cores x U / D``), not used.

With ``--peak-report`` (the saved output of ``bench/peak.py``, one run or ``--both``), the
measured completion of each run (``first at T0+F s`` plus the span ``S`` of its rate line: T0
to the last acceptance) is compared with the prediction for that run's cap. Exit status 1 when
a prediction is more than 25% off.

The capacity run should have the peak's roles (``bench/capacity.py --workers 2``) and its
cluster settings (the default "fast" cluster, as peak.py's); the model says which it read.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.peak import URGENT_FAMILIES, plan_sizes  # noqa: E402

TOLERANCE = 0.25
PEAK_PROCESSES = 4  # bench/peak.py: two ``worker --concurrency 2`` (soak.Roles.worker)
RATE_LINE = re.compile(
    r"rate: (?P<rate>\d+) accepted/s \((?P<n>\d+) over (?P<span>[\d.]+) s, "
    r"first at T0\+(?P<first>[\d.]+) s\)"
)
REPORT_TITLE = re.compile(r"peak report: (?:no cap|cap (?P<cap>[\d.]+) emails/s)")


@dataclass
class Costs:
    """What capacity.py measured, for one configuration."""

    cpu_ms_per_email: float
    cpu_ms_by_role: dict[str, float]
    idle_cpu_ms_per_s: float
    busy_share: float  # U: the machine's share the capacity run kept busy once sending
    dispatch_s: float
    measured_rate: float
    recipients: int
    workers: int
    durable: bool


@dataclass
class Prediction:
    emails: int
    rate: float
    cpu_rate: float
    process_rate: float
    completion_s: float
    with_u_s: float  # the check: the capacity run's busy share instead of a full machine


def costs_from(capacity: dict, config: str) -> Costs:
    """The per-email costs of ``config`` from capacity.py's ``--json`` output."""
    summary = capacity["summary"][config]
    per = summary["per_email"]
    idle = summary.get("idle_per_second") or {"cpu_ms": {}}
    elapsed = summary["elapsed_s"]
    dispatch = summary["dispatched_s"]
    cores = capacity["cpus"]
    n = capacity["recipients"]
    cpu_ms = per["cpu_ms_total"]
    # U over the sending part of the window: all the window's CPU over (elapsed - dispatch).
    busy = (cpu_ms * n / 1000) / (max(elapsed - dispatch, 1e-3) * cores)
    return Costs(
        cpu_ms_per_email=cpu_ms,
        cpu_ms_by_role=per["cpu_ms"],
        idle_cpu_ms_per_s=sum(idle["cpu_ms"].values()),
        busy_share=min(busy, 1.0),
        dispatch_s=dispatch,
        measured_rate=summary["emails_per_s_median"],
        recipients=n,
        workers=capacity.get("workers", 1),
        durable=capacity.get("durable", False),
    )


def peak_emails(scale: float, seed: int) -> int:
    """The emails bench/peak.py sends with these options (from its own plan)."""
    big, small = plan_sizes(scale, seed)
    return sum(big) + sum(small) + URGENT_FAMILIES


def predict(
    costs: Costs, *, emails: int, cores: int, cap: float, processes: int = PEAK_PROCESSES
) -> Prediction:
    """The bottleneck law above: the rate is the smallest of the cores', the processes' and
    the cap's, and the machine stays saturated from dispatch to the last email."""
    cpu_rate = (cores * 1000 - costs.idle_cpu_ms_per_s) / costs.cpu_ms_per_email
    process_rate = processes * 1000 / costs.cpu_ms_per_email
    rate = min(cpu_rate, process_rate)
    with_u = cores * costs.busy_share * 1000 / costs.cpu_ms_per_email
    if cap:
        rate, with_u = min(rate, cap), min(with_u, cap)
    return Prediction(
        emails,
        rate,
        cpu_rate,
        process_rate,
        costs.dispatch_s + emails / rate,
        costs.dispatch_s + emails / with_u,
    )


def measured_runs(report: str) -> list[tuple[float, float, int]]:
    """(cap, completion seconds after T0, emails) for each run in a peak.py report."""
    runs = []
    cap = None
    for line in report.splitlines():
        title = REPORT_TITLE.search(line)
        if title:
            cap = float(title["cap"]) if title["cap"] else 0.0
            continue
        found = RATE_LINE.search(line)
        if found and cap is not None:
            runs.append((cap, float(found["first"]) + float(found["span"]), int(found["n"])))
            cap = None
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--capacity", type=Path, required=True, help="capacity.py --json output")
    parser.add_argument("--config", default="direct", help="which configuration's costs")
    parser.add_argument("--rate", type=float, default=0.0, help="EDSMART_SEND_RATE; 0 = none")
    parser.add_argument("--scale", type=float, default=1.0, help="as peak.py's --scale")
    parser.add_argument("--seed", type=int, default=1, help="as peak.py's --seed")
    parser.add_argument("--cores", type=int, default=None, help="default: the capacity run's")
    parser.add_argument("--peak-report", type=Path, default=None, help="peak.py's output")
    opts = parser.parse_args(argv)
    capacity = json.loads(opts.capacity.read_text())
    costs = costs_from(capacity, opts.config)
    cores = opts.cores or capacity["cpus"]
    emails = peak_emails(opts.scale, opts.seed)
    print(
        f"costs ({opts.config}, {costs.recipients} emails, {costs.workers} worker instance(s), "
        f"{'durable' if costs.durable else 'fast'} cluster): {costs.cpu_ms_per_email:.3f} CPU-ms "
        "per email ("
        + ", ".join(f"{k} {v:.3f}" for k, v in costs.cpu_ms_by_role.items() if v)
        + f"); idle {costs.idle_cpu_ms_per_s:.0f} CPU-ms/s; busy share U {costs.busy_share:.2f}"
        f" of {cores} cores; due -> dispatched {costs.dispatch_s:.2f} s; "
        f"its own rate {costs.measured_rate:.0f}/s"
    )
    runs = [(opts.rate, None, emails)]
    if opts.peak_report:
        runs = [(cap, done, n) for cap, done, n in measured_runs(opts.peak_report.read_text())]
        if not runs:
            print("no peak report found in the file (a 'rate: ... first at T0+...' line)")
            return 2
    worst = 0.0
    for cap, done, n in runs:
        if done is not None and n != emails:
            print(
                f"  note: that run accepted {n} emails; the plan has {emails}: predicting for {n}"
            )
        p = predict(costs, emails=n, cores=cores, cap=cap)
        title = f"cap {cap:g}/s" if cap else "no cap"
        line = (
            f"{title}: predicted {p.completion_s:.1f} s from T0 to the last of {n} emails "
            f"(rate {p.rate:.0f}/s: cores allow {p.cpu_rate:.0f}/s, {PEAK_PROCESSES} processes "
            f"{p.process_rate:.0f}/s; with the capacity run's U instead: {p.with_u_s:.1f} s)"
        )
        if done is not None:
            error = p.completion_s / done - 1
            worst = max(worst, abs(error))
            verdict = "within" if abs(error) <= TOLERANCE else "OUTSIDE"
            line += f"; measured {done:.1f} s: {error:+.1%} ({verdict} {TOLERANCE:.0%})"
        print(line)
    return 1 if worst > TOLERANCE else 0


if __name__ == "__main__":
    sys.exit(main())
