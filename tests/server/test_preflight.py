"""Runs that could never make progress refuse to start, and one that stops making progress ends
with a clear error: no hang, no untrained model reported as finished, no broken ε promise."""

from __future__ import annotations

import json

import numpy as np
import pytest
from recipes import LOCAL_DP

from common.config import Config, ConfigError
from common.errors import DataError, NoProgressError
from common.federation import federation
from simulation.centralized import train_centralized
from simulation.run import simulate

SMALL = {**LOCAL_DP, "synthetic-users": 40, "synthetic-items": 20, "synthetic-groups": 2, "synthetic-min-len": 6,
         "synthetic-max-len": 10, "max-len": 8, "embedding-dim": 8, "hidden-dim": 8, "batch-size": 8,
         "partition": "iid", "num-clients": 2, "fraction-train": 1.0, "local-epochs": 1, "num-server-rounds": 2,
         "dp": False}


def _seq_file(path, users: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    path.write_text("".join(f"u{u} " + " ".join(str(i) for i in rng.integers(1, 15, size=8)) + "\n"
                            for u in range(users)))
    return path


def _refused(tmp_path, match: str, **settings) -> None:
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=match):
        simulate(Config.from_run_config({**SMALL, **settings, "out-dir": str(out)}), quiet=True)
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("settings", [{"num-clients": 1}, {"min-train-nodes": 5}], ids=["one-client", "five-nodes"])
def test_more_train_nodes_than_clients_is_refused(tmp_path, settings):
    _refused(tmp_path, "min-train-nodes is .* no round could ever start", **settings)


def test_a_seq_file_of_one_user_is_refused(tmp_path):
    data = _seq_file(tmp_path / "one.txt", users=1)
    _refused(tmp_path, "has 1 client", dataset="seq", **{"data-dir": str(data), "partition": "user"})


def test_bulyan_with_too_few_clients_is_refused(tmp_path):
    _refused(tmp_path, "bulyan needs at least 3 replies a round .* samples 2", aggregation="bulyan")


def test_fraction_train_zero_is_refused():
    with pytest.raises(ConfigError, match="fraction-train must be in"):
        Config.from_run_config({"fraction-train": 0.0})


def test_a_fixed_noise_that_cannot_keep_the_target_is_refused(tmp_path):
    promise = {"dp": True, "noise-multiplier": 0.3, "target-epsilon": 0.5}
    _refused(tmp_path, r"noise-multiplier 0.3 spends ε = .* more than target-epsilon 0.5", **promise)
    out = tmp_path / "central"
    with pytest.raises(ConfigError, match="more than target-epsilon 0.5"):
        train_centralized(Config.from_run_config({**SMALL, **promise, "epochs": 2}), out)
    assert not out.exists() and not list(tmp_path.glob(".central*"))
    # A σ large enough for the plan trains.
    cfg = Config.from_run_config({**SMALL, "dp": True, "noise-multiplier": 30.0, "target-epsilon": 0.5,
                                  "out-dir": str(tmp_path / "ok")})
    assert simulate(cfg, quiet=True)["dp"]["epsilon_max"] <= 0.5


def test_a_run_in_which_no_round_aggregates_ends_with_an_error(tmp_path):
    out = tmp_path / "run"
    cfg = Config.from_run_config({**SMALL, "attack": "nan", "attack-fraction": 1.0, "out-dir": str(out)})
    with pytest.raises(NoProgressError, match="no round was aggregated"):
        simulate(cfg, quiet=True)
    assert not (out / "model.pt").exists() and not (out / "summary.json").exists()
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["rejected"] for r in rounds[1:]] == [2, 2]


def test_resume_refuses_changed_input_data(tmp_path, interrupted_run):
    data = _seq_file(tmp_path / "data.txt", users=30)
    out = tmp_path / "run"
    settings = {**SMALL, "dataset": "seq", "data-dir": str(data), "out-dir": str(out)}
    interrupted_run(Config.from_run_config(settings), after=1)
    _seq_file(data, users=25)
    metrics = (out / "metrics.jsonl").read_text()
    with pytest.raises(DataError, match=r"input data changed since the run started \(then 30 users.*now 25 users"):
        simulate(Config.from_run_config({**settings, "resume": True}), quiet=True)
    assert (out / "metrics.jsonl").read_text() == metrics  # untouched
    _seq_file(data, users=30)
    federation.cache_clear()  # a new process would read the file again
    changed = r"config.json differs from the settings the run started with \(lr: 0.01 -> 0.5\)"
    with pytest.raises(DataError, match=changed):
        simulate(Config.from_run_config({**settings, "lr": 0.5, "resume": True}), quiet=True)
    assert simulate(Config.from_run_config({**settings, "resume": True}), quiet=True)["setting"]["rounds"] == 2


def test_a_plan_of_more_dp_steps_than_fedrec_accounts_is_refused(tmp_path):
    """PRV's cost grows with the steps: a plan past MAX_STEPS would seem to hang in the accountant."""
    out = tmp_path / "central"
    with pytest.raises(ConfigError, match="more than fedrec accounts"):
        train_centralized(Config.from_run_config({**SMALL, "dp": True, "batch-size": 1, "epochs": 10**5}), out)
    assert not out.exists()
