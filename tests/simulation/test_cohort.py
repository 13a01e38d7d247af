"""A round's clients trained as one batch give what the ClientApp gives them one by one.

The same train messages go through the real ClientApp twice: on a grid that hands them over a
cohort at a time (batched training) and on one that calls the ClientApp once per message. The
replies must match: weights within float tolerance, identical ε, windows, declines and metrics.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from recipes import LOCAL_DP

from client import cohort
from client.client_app import app
from common.config import Config
from common.federation import federation
from common.flower_compat import server_task_identity
from common.model import build_model
from common.replies import TrainMetrics
from simulation.grid import InProcessGrid
from simulation.run import simulate

# One client per user, users of 4 to 30 interactions: 1 to 3 windows, 1 or 2 batches of 2.
USERS: dict[str, Any] = {
    **LOCAL_DP,
    "synthetic-users": 24, "synthetic-items": 30, "synthetic-groups": 3, "synthetic-min-len": 4,
    "synthetic-max-len": 30, "max-len": 10, "embedding-dim": 8, "hidden-dim": 8, "batch-size": 2,
    "partition": "user", "num-server-rounds": 3, "lr": 0.05, "optimizer": "sgd", "dropout": 0.2,
}


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of clients in each call of the batched trainer."""
    sizes: list[int] = []
    original = cohort.train_clients

    def counting(model, jobs, cfg, *, epochs):
        sizes.append(len(jobs))
        return original(model, jobs, cfg, epochs=epochs)

    monkeypatch.setattr(cohort, "train_clients", counting)
    return sizes


def _round(settings: dict[str, Any], cohort_size: int, rounds: int = 1) -> list[list[Message]]:
    """`rounds` train rounds of every client from the same start, delivered `cohort_size` at a time."""
    cfg = Config.from_run_config(settings)
    clients = len(federation(cfg).clients)
    torch.manual_seed(0)
    arrays = ArrayRecord(build_model(cfg, federation(cfg).data.num_items).state_dict())
    grid = InProcessGrid(app, clients, settings, cohort_size=cohort_size)
    replies = []
    for server_round in range(1, rounds + 1):
        content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
        if cfg.central_dp:
            content["config"]["clipping_norm"] = cfg.central_clip  # what Flower's wrapper sends
        with server_task_identity(grid.run.run_id):
            messages = [Message(content, node, MessageType.TRAIN) for node in grid.get_node_ids()]
            replies.append(sorted(grid.send_and_receive(messages), key=lambda m: m.metadata.src_node_id))
    return replies


def _assert_same(batched: list[list[Message]], alone: list[list[Message]], atol: float = 1e-5) -> None:
    """`atol`: float noise between the fused LSTM kernel (one client) and vmap's step-by-step one;
    Adam's first steps, near sign(g), turn a 1e-9 gradient difference into one of up to lr / 100."""
    for round_b, round_a in zip(batched, alone, strict=True):
        assert [m.metadata.src_node_id for m in round_b] == [m.metadata.src_node_id for m in round_a]
        for b, a in zip(round_b, round_a, strict=True):
            assert not b.has_error() and not a.has_error(), (b.error if b.has_error() else a.error)
            mb, ma = TrainMetrics.of(b), TrainMetrics.of(a)
            assert (mb.num_examples, mb.epsilon, mb.declined) == (ma.num_examples, ma.epsilon, ma.declined)
            assert mb.train_loss == pytest.approx(ma.train_loss, rel=1e-4, nan_ok=True)
            if mb.declined:
                assert "arrays" not in b.content and "arrays" not in a.content
                continue
            for key in a.content["arrays"].keys():
                assert torch.allclose(torch.from_numpy(b.content["arrays"][key].numpy()),
                                      torch.from_numpy(a.content["arrays"][key].numpy()), rtol=1e-4, atol=atol), key


@pytest.mark.parametrize("settings", [
    pytest.param({"dp": False, "local-epochs": 1}, id="no-dp"),
    pytest.param({"dp": False, "local-epochs": 2, "optimizer": "adam", "lr": 0.01}, id="no-dp-2-epochs-adam"),
    pytest.param({"dp": True, "noise-multiplier": 1.1, "target-epsilon": 50.0, "local-epochs": 1}, id="dp"),
    pytest.param({"dp": True, "noise-multiplier": 1.1, "target-epsilon": 50.0, "local-epochs": 2}, id="dp-2-epochs"),
    pytest.param({"dp": True, "noise-multiplier": 1.1, "target-epsilon": 50.0, "local-epochs": 1,
                  "central-dp": True, "central-clip": 0.05, "central-noise-multiplier": 1.0}, id="dp-central-clipping"),
    pytest.param({"dp": False, "local-epochs": 1, "central-dp": True, "central-clip": 0.05,
                  "central-noise-multiplier": 1.0}, id="central-dp-only"),  # the default private configuration
])
def test_batched_round_equals_one_by_one(settings: dict[str, Any], batches: list[int]) -> None:
    run = {**USERS, **settings}
    batched = _round(run, cohort_size=64)
    assert batches == [len(batched[0])], "the whole round should have trained as one batch"
    alone = _round(run, cohort_size=1)
    assert set(batches[1:]) == {1}
    _assert_same(batched, alone, atol=1e-5 if run["optimizer"] == "sgd" else run["lr"] / 100)
    sizes = {TrainMetrics.of(m).num_examples for m in alone[0]}
    assert len(sizes) > 1, "the clients should differ in size"
    if run.get("central-dp"):  # Flower's mod clipped every client's whole update to the norm sent
        torch.manual_seed(0)
        start = build_model(Config.from_run_config(run), federation(Config.from_run_config(run)).data.num_items)
        for reply in batched[0]:
            arrays = reply.content["arrays"]
            norm = sum(((torch.from_numpy(arrays[k].numpy()) - v) ** 2).sum() for k, v in start.state_dict().items())
            assert norm.sqrt() <= run["central-clip"] * (1 + 1e-4)


def test_declines_and_ledgers_match_over_rounds(batches: list[int]) -> None:
    """A fixed σ and a small budget: clients whose single batch costs the most decline in later rounds
    (per window: a one-user client samples its one user at q = 1, so every client costs the same per user)."""
    run = {**USERS, "dp": True, "dp-unit": "window", "noise-multiplier": 1.5, "target-epsilon": 5.0, "local-epochs": 1}
    batched, alone = _round(run, cohort_size=64, rounds=3), _round(run, cohort_size=1, rounds=3)
    _assert_same(batched, alone)
    declined = [sum(TrainMetrics.of(m).declined for m in replies) for replies in alone]
    assert declined[0] == 0 and 0 < declined[-1] < len(alone[-1])


def test_secure_aggregation_round_batched_equals_one_by_one(tmp_path, batches: list[int]) -> None:
    """SecAgg+'s four stages through the batched grid: the same securely aggregated model (up to
    SecAgg+'s stochastic quantisation, steps of 3.8e-6) and the same bookkeeping."""
    settings = {**USERS, "partition": "iid", "num-clients": 4, "fraction-train": 1.0, "num-server-rounds": 1,
                "dp": True, "noise-multiplier": 1.1, "target-epsilon": 50.0, "secagg": True}
    models, rounds = [], []
    for cohort_size in (64, 1):
        out = tmp_path / f"cohort-{cohort_size}"
        simulate(Config.from_run_config({**settings, "out-dir": str(out)}), quiet=True, cohort_size=cohort_size)
        models.append(torch.load(out / "model.pt", weights_only=True))
        assert batches.pop(0) == (4 if cohort_size > 1 else 1)
        rounds.append(json.loads((out / "metrics.jsonl").read_text().splitlines()[1]))
    for key in ("trained", "declined", "failed", "rejected", "epsilon_max", "epsilon_median", "train_loss"):
        assert rounds[0][key] == pytest.approx(rounds[1][key], rel=1e-4), key
    assert rounds[0]["trained"] == 4
    assert max((models[0][k] - models[1][k]).abs().max().item() for k in models[1]) < 2e-5
