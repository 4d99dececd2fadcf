"""bench/history.py at a tiny scale: it builds, measures both databases and prints its table.

The figures themselves are not checked here (the bench's own exit status says whether the
bounds hold at full scale); this only keeps the bench runnable as the code it measures moves.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.history import BIG_FAMILIES, OPEN_MAILINGS, OPEN_SIZE, SPECS, Shape

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "edsmart_history_smoke"


def test_shape_adds_up_to_about_the_deliveries_asked_for():
    for deliveries in (10_000, 200_000, 10_000_000):
        shape = Shape.of(deliveries)
        rows = (
            shape.big_mailings * BIG_FAMILIES
            + shape.other_mailings * 100
            + shape.open_mailings * OPEN_SIZE
        )
        assert abs(rows - deliveries) <= 0.01 * deliveries
    assert Shape.of(10_000_000).big_mailings == 500
    assert Shape.of(10_000).open_mailings == OPEN_MAILINGS


@pytest.mark.workers
def test_bench_runs_end_to_end_at_a_tiny_scale():
    import psycopg

    argv = [
        *(sys.executable, str(ROOT / "bench" / "history.py")),
        *("--deliveries", "4000", "--schools", "8", "--reps", "1", "--send-reps", "1"),
        *("--db-prefix", PREFIX, "--rebuild"),
    ]
    try:
        result = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=280, check=False
        )
    finally:
        with psycopg.connect("postgres://postgres@127.0.0.1:5432/postgres", autocommit=True) as c:
            for suffix in ("full", "empty"):
                c.execute(f'DROP DATABASE IF EXISTS "{PREFIX}_{suffix}" WITH (FORCE)')
    out = result.stdout + result.stderr
    assert result.returncode in (0, 1), out[-5000:]
    assert "full database: --deliveries 4000 --schools 8: deliveries" in out, out[-5000:]
    assert "new 200-family broadcast, due -> recorded" in out, out[-5000:]
    # Every item was measured (a bound may be missed at this scale on a busy machine; an item
    # that could not be measured at all is a broken bench).
    rows = {line.split("  ")[0].strip(): line for line in out.splitlines()}
    for spec in SPECS:
        line = next((row for label, row in rows.items() if label == spec.label), None)
        assert line is not None and "ERROR" not in line, (spec.label, out[-5000:])
