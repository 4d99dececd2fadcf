"""bench/capacity.py at a small scale, and bench/peak_model.py on known numbers.

The capacity bench's figures feed docs/scaling.md and the peak model; this keeps it runnable as
the pipeline moves, and checks that what it reports is plausible for this pipeline (one
statement and one writing commit per email on the hot path, a few kilobytes of WAL, an email's
bytes at the sink), so a bench that silently measured nothing, or something else, fails here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import capacity, peak_model
from edsmart.devstack.pgbouncer import pgbouncer_executable

ROOT = Path(__file__).resolve().parent.parent
RECIPIENTS = 200


@pytest.mark.workers
def test_capacity_quick_reports_plausible_costs(tmp_path: Path) -> None:
    """One configuration (about 30 s): through PgBouncer where it is installed, the path with
    the most parts; the ratios between configurations are checked below on known numbers."""
    configs = "pgbouncer" if pgbouncer_executable() else "direct"
    out = tmp_path / "capacity.json"
    argv = [
        *(sys.executable, str(ROOT / "bench" / "capacity.py"), "--quick"),
        *("--recipients", str(RECIPIENTS), "--configs", configs, "--json", str(out)),
    ]
    result = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=280, check=False
    )
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-5000:]
    report = json.loads(out.read_text())
    assert report["recipients"] == RECIPIENTS
    assert [r["config"] for r in report["runs"]] == configs.split(",")
    for run in report["runs"]:
        assert run["exactly_once"], run
        per = run["per_email"]
        # The hot path: one statement per email (the previous outcome and this start, together)
        # plus the claims, fan-out and beat's work; and one commit that writes per email.
        assert 0.9 <= per["statements"] <= 6, per
        assert 0.9 <= per["commit_records"] <= 3, per
        assert per["commits"] >= per["commit_records"] * 0.9, per
        assert 500 <= per["wal_bytes"] <= 50_000, per
        assert per["exec_ms"] > 0, per
        assert per["redis_commands"] > 0, per
        # Each email is over a kilobyte (text and HTML parts); the envelope adds to it.
        assert per["smtp_bytes"] > per["message_bytes"] > 1000, per
        assert per["cpu_ms"]["worker"] > 0 and per["cpu_ms"]["postgres"] > 0, per
        assert run["emails_per_s"] > 0
        assert any("notifications_delivery" in s["query"] for s in run["top_statements"]), run
        if run["config"] == "pgbouncer":
            # Every email's outcome and start went through the pooler. (Its CPU, about
            # 0.07 ms per email, is one /proc tick of 10 ms or none over 200 emails: measured,
            # reported, but not a sign of anything at this size.)
            assert run["pgbouncer_transactions"] >= RECIPIENTS, run
            assert per["cpu_ms"]["pgbouncer"] >= 0, per
        else:
            assert run["pgbouncer_transactions"] is None, run
    assert "per email:" in text and "CPU per email:" in text


def test_capacity_ratios_pair_the_rounds() -> None:
    """Each round's configurations ran back to back; the ratio is taken per round, then the
    median, so a machine that slowed between rounds does not make one look better."""

    def run(config: str, rate: float) -> dict:
        per = {
            "statements": 1.0,
            "transaction_control": 0.0,
            "fk_checks": 2.0,
            "commits": 1.0,
            "commit_records": 1.0,
            "exec_ms": 0.3,
            "plan_ms": 0.0,
            "wal_bytes": 2900,
            "wal_fpi_bytes": 0,
            "redis_commands": 0.2,
            "smtp_bytes": 1971,
            "message_bytes": 1880,
            "cpu_ms": {"worker": 0.8, "postgres": 0.5},
            "cpu_ms_total": 1.3,
        }
        return {
            "config": config,
            "recipients": 10_000,
            "emails_per_s": rate,
            "per_email": per,
            "first_acceptance_s": 1.0,
            "dispatched_s": 0.5,
            "elapsed_s": 10_000 / rate,
            "cpu_utilisation": 0.9,
            "top_statements": [],
        }

    runs = [
        run("direct", 1000),
        run("pgbouncer", 500),
        run("direct", 2000),
        run("pgbouncer", 1200),
        run("direct", 1500),
        run("pgbouncer", 900),
    ]
    lines, summary = capacity.report_lines(runs, ["direct", "pgbouncer"])
    assert summary["pgbouncer"]["ratio_to_direct"] == 0.6  # 0.5, 0.6, 0.6
    assert summary["direct"]["emails_per_s_median"] == 1500
    assert any(line.startswith("ratio pgbouncer/direct: median 0.60") for line in lines), lines


def _capacity_json(**summary: object) -> dict:
    base = {
        "per_email": {"cpu_ms_total": 1.0, "cpu_ms": {"worker": 0.6, "postgres": 0.4}},
        "idle_per_second": {"cpu_ms": {"beat": 10.0, "worker": 10.0}},
        "elapsed_s": 6.0,
        "dispatched_s": 1.0,
        "emails_per_s_median": 1666.0,
    }
    return {"cpus": 2, "recipients": 10_000, "workers": 2, "summary": {"direct": base | summary}}


def test_peak_model_prediction_from_costs() -> None:
    costs = peak_model.costs_from(_capacity_json(), "direct")
    # 10 s of CPU over 5 s of sending on 2 cores: the machine was all busy.
    assert costs.busy_share == pytest.approx(1.0)
    uncapped = peak_model.predict(costs, emails=100_000, cores=2, cap=0)
    assert uncapped.rate == pytest.approx((2000 - 20) / 1.0)
    assert uncapped.completion_s == pytest.approx(1.0 + 100_000 / 1980)
    capped = peak_model.predict(costs, emails=100_000, cores=2, cap=500)
    assert capped.rate == 500
    assert capped.completion_s == pytest.approx(201.0)


def test_peak_model_reads_both_runs_of_a_peak_report(tmp_path: Path) -> None:
    report = "\n".join(
        [
            "================ peak report: no cap ================",
            "rate: 1683 accepted/s (204150 over 121.3 s, first at T0+3.7 s); busiest 1 s ...",
            "================ peak report: cap 500 emails/s ================",
            "rate: 483 accepted/s (204150 over 422.7 s, first at T0+2.7 s); busiest 1 s ...",
        ]
    )
    assert peak_model.measured_runs(report) == [(0.0, 125.0, 204150), (500.0, 425.4, 204150)]
    capacity = tmp_path / "capacity.json"
    capacity.write_text(json.dumps(_capacity_json()))
    saved = tmp_path / "peak.txt"
    saved.write_text(report)
    # 1 + 204150/1980 = 104.1 s against 125.0 (-17%); 1 + 408.3 against 425.4 (-4%): within.
    assert peak_model.main(["--capacity", str(capacity), "--peak-report", str(saved)]) == 0
    # Costs twice as high: 207 s against 125 s is outside 25%, and the model says so.
    capacity.write_text(
        json.dumps(_capacity_json(per_email={"cpu_ms_total": 2.0, "cpu_ms": {"worker": 2.0}}))
    )
    assert peak_model.main(["--capacity", str(capacity), "--peak-report", str(saved)]) == 1
