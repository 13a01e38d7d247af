"""Checkpoints from before the tied embedding travelled once still resume; mismatched ones are refused."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.serverapp.strategy import FedAvg

from common.errors import DataError
from common.model import AttentionLSTM
from server import checkpoint
from server.strategy import GuardedStrategy


def _old_checkpoint(out, head_shift: float) -> None:
    """A checkpoint of round 1 whose arrays still hold head.weight (embedding + `head_shift`)."""
    arrays = AttentionLSTM(20, embedding_dim=8, hidden_dim=8).state_dict()
    arrays["head.weight"] = arrays["item_embedding.weight"] + head_shift
    torch.save({"round": 1, "elapsed": 2.0, "arrays": arrays, "optimizer": {}, "epsilons": json.dumps({"7": 0.5}),
                "clients": ""}, out / checkpoint.CHECKPOINT)
    (out / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1}\n{"round": 2}\n')


def _restore(out):
    model = AttentionLSTM(20, embedding_dim=8, hidden_dim=8)
    return checkpoint.restore(out, GuardedStrategy(FedAvg(), seed=0, min_train_nodes=1), object(), model)


def test_an_older_checkpoint_resumes_in_the_new_layout(tmp_path):
    _old_checkpoint(tmp_path, head_shift=0.0)
    state = _restore(tmp_path)
    assert "head.weight" not in state["arrays"] and "item_embedding.weight" in state["arrays"]
    assert (state["round"], state["elapsed"], state["epsilons"]) == (1, 2.0, {7: 0.5})
    assert (tmp_path / "metrics.jsonl").read_text() == '{"round": 0}\n{"round": 1}\n'  # round 2 is replayed


def test_a_checkpoint_whose_head_differs_is_refused_untouched(tmp_path):
    _old_checkpoint(tmp_path, head_shift=1.0)
    with pytest.raises(DataError, match="head.weight differs"):
        _restore(tmp_path)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
