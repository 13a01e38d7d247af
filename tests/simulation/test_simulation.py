"""The in-process simulation end to end: the real ServerApp, strategy and ClientApp, no Ray."""

from __future__ import annotations

import json

import pytest
import torch
from recipes import LOCAL_DP

from common.config import Config
from common.dataset import eval_examples, load_dataset, popularity
from common.metrics import evaluate_popularity
from simulation.run import simulate

SMALL = {**LOCAL_DP, "synthetic-users": 120, "synthetic-items": 50, "synthetic-groups": 5, "synthetic-min-len": 10,
         "synthetic-max-len": 20, "max-len": 15, "embedding-dim": 32, "hidden-dim": 32, "batch-size": 16,
         "lr": 0.02, "dropout": 0.0, "partition": "iid", "num-clients": 4, "fraction-train": 1.0,
         "local-epochs": 5, "num-server-rounds": 3}


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_three_rounds_learn_and_beat_popularity(tmp_path):
    out = tmp_path / "run"
    cfg = Config.from_run_config({**SMALL, "dp": False, "out-dir": str(out)})
    summary = simulate(cfg, quiet=True)
    rounds = _metrics(out)
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert all(r["trained"] == 4 and r["failed"] == r["declined"] == r["rejected"] == 0 for r in rounds[1:])
    assert rounds[-1]["ndcg@10"] > rounds[0]["ndcg@10"] + 0.05
    data = load_dataset(cfg)
    inputs, _, targets = eval_examples(data.sequences, "valid", cfg.max_len)
    popular = evaluate_popularity(popularity(data.sequences, data.num_items), targets, data.num_items, inputs=inputs)
    assert rounds[-1]["ndcg@10"] > 1.5 * popular["ndcg@10"]
    assert summary["test"]["ndcg@10"] > summary["popularity_test"]["ndcg@10"]
    assert {p.name for p in out.iterdir()} >= {"config.json", "metrics.jsonl", "summary.json", "model.pt",
                                               "items.json", "checkpoint.pt"}
    assert "item_embedding.weight" in torch.load(out / "model.pt", weights_only=True)


def test_dp_run_reports_cumulative_epsilon(tmp_path):
    out = tmp_path / "dp"
    cfg = Config.from_run_config({**SMALL, "dp": True, "target-epsilon": 5.0, "out-dir": str(out), "local-epochs": 1})
    summary = simulate(cfg, quiet=True)
    eps = [r["epsilon_max"] for r in _metrics(out)[1:]]
    assert eps == sorted(eps) and eps[0] > 0
    assert eps[-1] <= 5.0 + 1e-6 and summary["dp"]["epsilon_max"] == pytest.approx(eps[-1])
    assert summary["dp"]["clients_accounted"] == 4 and "window" in summary["dp"]["unit"]


def test_resume_reproduces_the_uninterrupted_run(tmp_path, interrupted_run):
    settings = {**SMALL, "dp": True, "target-epsilon": 8.0, "local-epochs": 1, "num-server-rounds": 4,
                "fraction-train": 0.5, "min-train-nodes": 1}
    whole = tmp_path / "whole"
    simulate(Config.from_run_config({**settings, "out-dir": str(whole)}), quiet=True)

    cut = tmp_path / "cut"
    interrupted_run(Config.from_run_config({**settings, "out-dir": str(cut)}), after=2)
    assert not (cut / "summary.json").exists()
    simulate(Config.from_run_config({**settings, "out-dir": str(cut), "resume": True}), quiet=True)

    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (whole, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in _metrics(whole)]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in _metrics(cut)]
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (whole, cut))
    assert s1["test"] == s2["test"] and s1["dp"] == s2["dp"]


def test_fedadam_runs_and_checkpoints_its_moments(tmp_path):
    out = tmp_path / "adam"
    cfg = Config.from_run_config({**SMALL, "dp": False, "server-strategy": "fedadam", "server-lr": 0.01,
                                  "num-server-rounds": 2, "local-epochs": 1, "out-dir": str(out)})
    summary = simulate(cfg, quiet=True)
    assert summary["setting"]["strategy"] == "fedadam"
    last = _metrics(out)[-1]
    assert last["trained"] == last["sampled"] > 0 and last["rejected"] == 0  # round 2 used FedAdam's weights
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["round"] == 2 and set(saved["optimizer"]) == {"m_t", "v_t"}
    assert set(saved["optimizer"]["m_t"]) == set(saved["arrays"])


def test_secure_aggregation_gives_the_same_model_up_to_its_quantisation(tmp_path):
    """One round with and without SecAgg+ from the same start: the clients train identically, so the
    models differ only by SecAgg+'s stochastic quantisation (steps of 16 / 2**22 = 3.8e-6)."""
    models, summaries = {}, {}
    for secagg in (False, True):
        out = tmp_path / f"secagg-{secagg}"
        cfg = Config.from_run_config({**SMALL, "dp": False, "num-server-rounds": 1, "secagg": secagg,
                                      "out-dir": str(out)})
        summaries[secagg] = simulate(cfg, quiet=True)
        models[secagg] = torch.load(out / "model.pt", weights_only=True)
        assert _metrics(out)[1]["trained"] == 4
    assert summaries[True]["secure_aggregation"]["enabled"] and not summaries[False]["secure_aggregation"]["enabled"]
    gaps = [(models[True][k] - models[False][k]).abs().max().item() for k in models[False]]
    assert max(gaps) < 2e-5 and max(gaps) > 0  # > 0: the weights really went through SecAgg+'s quantisation


def test_secure_aggregation_combines_with_local_and_central_dp(tmp_path):
    out = tmp_path / "all"
    cfg = Config.from_run_config({**SMALL, "dp": True, "local-epochs": 1, "num-server-rounds": 2, "secagg": True,
                                  "central-dp": True, "central-clip": 0.5, "out-dir": str(out)})
    summary = simulate(cfg, quiet=True)
    assert [r["trained"] for r in _metrics(out)[1:]] == [4, 4]
    assert summary["dp"]["epsilon_max"] > 0 and summary["central_dp"]["enabled"]
    assert summary["secure_aggregation"]["enabled"]
