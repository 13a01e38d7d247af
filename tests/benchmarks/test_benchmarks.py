"""The benchmark suite's smoke run (CI) and its plots; the suite itself runs on demand."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import benchmarks.privacy_utility as privacy_utility
import benchmarks.speed as speed
from common.dataset import load_dataset, training_windows

ROOT = Path(__file__).resolve().parents[2]


def test_speed_smoke_reports_what_it_measured_on_synthetic_data():
    """Timings vary with the machine, so this checks what does not: every measurement ran, on the
    windows it says, DP spent no more than its target, and each reported number is the measured one."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--smoke"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    measured = json.loads(lines[-1])
    steps, rounds = measured["steps"], measured["rounds"]
    assert [row for row in lines if row.startswith("| synthetic")] == [rounds["synthetic"]["row"]] + [
        step["row"] for step in steps]

    # (1) one step of each kind per batch size, the ratio of the measured seconds
    assert [(step["data"], step["windows"]) for step in steps] == [("synthetic", n) for n in (1, 3, 16)]
    for step in steps:
        seconds = step["seconds"]
        assert set(seconds) == {"plain", "fedrec DP", "Opacus hooks"} and all(s > 0 for s in seconds.values())
        assert step["ratio"] == seconds["fedrec DP"] / seconds["plain"]
        cells = step["row"].split(" | ")
        milliseconds = [f"{1000 * seconds[kind]:.1f}" for kind in ("plain", "fedrec DP", "Opacus hooks")]
        assert cells[1:5] == [str(step["windows"]), *milliseconds]
        assert cells[5].startswith(f"**{step['ratio']:.2f}×**")

    # (2) the epoch and the round over the same data: every window, every user a client, within ε
    result = rounds["synthetic"]
    cfg = speed.config("synthetic")
    data = load_dataset(cfg)
    assert result["central"]["windows"] == len(training_windows(data.sequences, cfg.max_len))
    assert result["round"]["trained"] == result["round"]["users"] == len(data.sequences) == 200
    for spent in (result["central"]["epsilon"], result["round"]["epsilon_max"]):
        assert 0 < spent <= speed.DP["target-epsilon"] + 1e-6
    assert result["ratio"] == result["round"]["seconds"] / result["central"]["seconds"]
    assert f"**{result['ratio']:.2f}×**" in result["row"]
    assert result["ms_per_client"] == 1000 * result["round"]["seconds"] / 200


def test_plots_are_drawn_from_stored_results(tmp_path, monkeypatch):
    monkeypatch.setattr(privacy_utility, "FIGURES", tmp_path)
    run = {"epsilon_spent": 1.0, "test_ndcg@10": 0.04, "test_hr@10": 0.02, "rounds": 2, "seconds_per_round": 1.0,
           "curve": [[0, 0.001], [1, 0.005], [2, 0.01]]}
    results = {"toy": {"centralized_ndcg@10": 0.05, "popularity_ndcg@10": 0.02, "users": 10, "items": 5,
                       "runs": {"user/5/1.0": run, f"user/5/{math.inf}": {**run, "epsilon_spent": None,
                                                                           "test_ndcg@10": 0.05},
                                "window/1/8.0": run}}}
    written = privacy_utility.plot(results)
    assert [p.name for p in written] == ["privacy_utility.png", "learning_curves_toy.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    rows = [row.split(" | ") for row in privacy_utility.table(results)]
    # one row per run, each curve's ε in order; the multiple of popularity and the share of its own ε = ∞ run
    user = "user-level central DP"
    assert [(r[1], r[2], r[3]) for r in rows] == [(user, "5", "1"), (user, "5", "∞"), ("local DP per window", "1", "8")]
    assert [(r[7], r[8]) for r in rows] == [("2.00×", "80%"), ("2.50×", "100%"), ("2.00×", "–")]


def test_user_level_recipe_is_central_dp_at_the_cohort_asked_for():
    settings = privacy_utility.recipe("user", 8.0, 1000, 20000)
    assert settings["central-dp"] == "true" and settings["dp"] == "false"
    assert settings["central-target-epsilon"] == "8.0"
    assert float(settings["fraction-train"]) * 20000 == 1000
    plain = privacy_utility.recipe("user", math.inf, 1000, 20000)
    # ε = ∞ is the same recipe with no clipping and no noise, whatever the run config's defaults are
    assert (plain["central-dp"], plain["dp"]) == ("false", "false")
    private = {*privacy_utility.USER_DP, "central-dp", "central-target-epsilon"}
    assert {k: v for k, v in settings.items() if k not in private} == {
        k: v for k, v in plain.items() if k != "central-dp"}


def test_accuracy_reports_both_protocols_of_the_model_it_trained():
    """One smoke run (synthetic, 2 epochs): the table shows what the run measured, the data set's
    own protocol first, and the run's own protocol is what `fedrec train` reports as its test."""
    import benchmarks.accuracy as accuracy

    done = accuracy.run("ml-100k", 0, None, smoke=True)
    assert done["protocol"] == "recbole" and set(done["test"]) == {"recbole", "s3rec"}
    assert done["epochs"] == 2 and 1 <= done["best_epoch"] <= 2 and done["seconds_to_best"] > 0
    for scores in done["test"].values():
        assert all(0 <= v <= 1 for who in scores.values() for v in who.values())
    rows = accuracy.table({"ml-100k": [done, {**done, "seed": 1}]}).splitlines()[2:]
    own, other = (row.split(" | ") for row in rows)
    assert own[1] == "**recbole**" and other[1] == "s3rec (selected on recbole)"
    assert own[4] == f"**{done['test']['recbole']['model']['ndcg@10']:.4f} ± 0.0000**"
    assert other[4] == f"**{done['test']['s3rec']['model']['ndcg@10']:.4f} ± 0.0000**"
    assert own[6] == f"{done['test']['recbole']['popularity']['ndcg@10']:.4f}"
