"""The benchmark suite's smoke run (CI) and its plots; the suite itself runs on demand."""

import math
import os
import subprocess
import sys
from pathlib import Path

import benchmarks.privacy_utility as privacy_utility

ROOT = Path(__file__).resolve().parents[2]


def test_speed_smoke_runs_every_ratio_on_synthetic_data():
    done = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--smoke"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| synthetic")]
    assert len(rows) == 4  # three batch sizes for the step ratio, one round against an epoch
    for row in rows:
        ratio = float(row.split("**")[1].rstrip("×"))
        assert 0 < ratio < 100


def test_plots_are_drawn_from_stored_results(tmp_path, monkeypatch):
    monkeypatch.setattr(privacy_utility, "FIGURES", tmp_path)
    run = {"epsilon_spent": 1.0, "test_ndcg@10": 0.01, "test_hr@10": 0.02, "rounds": 2, "seconds_per_round": 1.0,
           "curve": [[0, 0.001], [1, 0.005], [2, 0.01]]}
    results = {"toy": {"centralized_ndcg@10": 0.05, "popularity_ndcg@10": 0.02, "users": 10, "items": 5,
                       "runs": {"1.0": run, str(math.inf): {**run, "epsilon_spent": None, "test_ndcg@10": 0.03}}}}
    written = privacy_utility.plot(results)
    assert [p.name for p in written] == ["privacy_utility.png", "learning_curves_toy.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert [row.split(" | ")[1] for row in privacy_utility.table(results)] == ["1", "∞"]
