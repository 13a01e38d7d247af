"""Canary exposure: a model that trained on planted canaries ranks them far above held-out ones."""

from __future__ import annotations

import json

import numpy as np
import torch
from recipes import LOCAL_DP

from common.config import Config
from common.dataset import load_dataset
from common.model import build_model
from simulation.canaries import advantage, exposure, plant
from simulation.run import simulate

SMALL = {**LOCAL_DP, "synthetic-users": 150, "synthetic-items": 60, "synthetic-groups": 3, "synthetic-min-len": 8,
         "synthetic-max-len": 14, "max-len": 12, "embedding-dim": 16, "hidden-dim": 16, "batch-size": 16,
         "lr": 0.02, "dropout": 0.0}


def test_planted_canaries_are_in_the_file_and_held_out_ones_are_not(tmp_path):
    data = load_dataset(Config.from_run_config(SMALL))
    planted, held_out = plant(data, tmp_path / "c", count=3, length=6, repeats=2, seed=1)
    text = (tmp_path / "c" / "data.txt").read_text()
    assert len(text.splitlines()) == 150
    for canary in planted:
        assert text.count(" ".join(canary)) == 2
    for canary in held_out:
        assert " ".join(canary) not in text


def test_memorised_canaries_show_exposure_that_held_out_ones_do_not(tmp_path):
    data = load_dataset(Config.from_run_config(SMALL))
    planted, held_out = plant(data, tmp_path / "c", count=4, length=6, repeats=3, seed=1)
    out = tmp_path / "run"
    cfg = Config.from_run_config({**SMALL, "dataset": "seq", "data-dir": str(tmp_path / "c" / "data.txt"), "dp": False,
                                  "partition": "iid", "num-clients": 2, "fraction-train": 1.0, "local-epochs": 10,
                                  "num-server-rounds": 3, "out-dir": str(out)})
    simulate(cfg, quiet=True)
    items = json.loads((out / "items.json").read_text())["item_ids"]
    model = build_model(cfg, len(items))
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    seen = [exposure(model, c, items) for c in planted]
    unseen = [exposure(model, c, items) for c in held_out]
    assert np.mean(seen) > np.mean(unseen) + 1.0  # bits
    assert advantage(seen, unseen) > 0.5
    assert advantage(unseen, seen) < 0  # the statistic is not symmetric by accident
