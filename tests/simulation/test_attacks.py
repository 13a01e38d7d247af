"""Simulated attacks hurt FedAvg, and the defences limit them (synthetic data, fixed seed).

10 clients of the small synthetic set, 2 of them malicious, 3 non-private rounds: big enough for
the robust aggregations (Bulyan needs 4f + 3 replies), small enough to run in seconds.
"""

from __future__ import annotations

import json

import pytest
from recipes import LOCAL_DP

from common.config import Config
from common.dataset import load_dataset, popularity
from simulation.attacks import malicious_partitions
from simulation.run import simulate

BASE = {**LOCAL_DP, "synthetic-users": 150, "synthetic-items": 50, "synthetic-groups": 5, "synthetic-min-len": 10,
        "synthetic-max-len": 20, "max-len": 15, "batch-size": 16, "lr": 0.02, "dropout": 0.0, "dp": False,
        "partition": "iid", "num-clients": 10, "fraction-train": 1.0, "min-train-nodes": 1, "local-epochs": 5,
        "num-server-rounds": 3, "attack-fraction": 0.2}
NO_BOUND = {"update-norm-factor": 0}


@pytest.fixture(scope="module")
def target() -> str:
    """A rarely consumed item (a quarter of the way up the popularity order): what an attacker pushes."""
    data = load_dataset(Config.from_run_config(BASE))
    counts = popularity(data.sequences, data.num_items)[1:]
    return str(data.item_ids[counts.argsort(kind="stable")[len(counts) // 4]])


def run(tmp_path, name: str, target: str, **settings) -> tuple[dict, list[dict]]:
    out = tmp_path / name
    cfg = Config.from_run_config({**BASE, "target-item": target, "out-dir": str(out), **settings})
    summary = simulate(cfg, quiet=True)
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary["test"], rounds


def test_sign_flip_hurts_fedavg_and_median_or_the_norm_bound_limit_it(tmp_path, target):
    clean, _ = run(tmp_path, "clean", target, **NO_BOUND)
    fedavg, _ = run(tmp_path, "fedavg", target, attack="sign-flip", **NO_BOUND)
    median, _ = run(tmp_path, "median", target, attack="sign-flip", aggregation="median", **NO_BOUND)
    bounded, rounds = run(tmp_path, "bounded", target, attack="sign-flip")
    assert fedavg["ndcg@10"] < 0.6 * clean["ndcg@10"]
    assert median["ndcg@10"] > fedavg["ndcg@10"] + 0.05
    assert bounded["ndcg@10"] > 0.9 * clean["ndcg@10"]
    assert all(r["rejected_by"] == {"norm": 2} for r in rounds[1:])  # the two attackers, every round


def test_a_pushed_item_takes_over_fedavg_and_the_defences_keep_it_out(tmp_path, target):
    clean, _ = run(tmp_path, "clean", target, **NO_BOUND)
    fedavg, _ = run(tmp_path, "fedavg", target, attack="target", **NO_BOUND)
    median, _ = run(tmp_path, "median", target, attack="target", aggregation="median", **NO_BOUND)
    bounded, _ = run(tmp_path, "bounded", target, attack="target")
    assert clean["target-exposure@10"] < 0.05
    assert fedavg["target-exposure@10"] > 0.5
    assert median["target-exposure@10"] < 0.5 * fedavg["target-exposure@10"]
    assert bounded["target-exposure@10"] <= clean["target-exposure@10"] + 0.02


def test_nan_updates_are_rejected_and_counted_each_round(tmp_path, target):
    result, rounds = run(tmp_path, "nan", target, attack="nan", **NO_BOUND)
    assert all(r["rejected_by"] == {"nonfinite": 2} and r["trained"] == 8 for r in rounds[1:])
    assert result["ndcg@10"] > 0


def test_malicious_clients_are_drawn_from_the_seed():
    cfg = Config.from_run_config({**BASE, "attack": "scale"})
    chosen = malicious_partitions(cfg, 10)
    assert len(chosen) == 2 and chosen == malicious_partitions(cfg, 10)
    assert malicious_partitions(Config.from_run_config({**BASE, "attack": "scale", "seed": 1}), 10) != chosen
    assert malicious_partitions(Config.from_run_config(BASE), 10) == frozenset()  # attack = none
