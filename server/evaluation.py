"""Central evaluation: the global model, and the most-popular baseline, on the server's held-out users.

The held-out users are, by default in simulation, every user's leave-one-out targets (numbers
then compare with the centralized model); with `holdout-users` > 0 a fraction of users is kept
out of training entirely and only they are evaluated, the honest choice in a deployment.
"""

from __future__ import annotations

from typing import Literal

import torch

from common.config import Config
from common.dataset import eval_examples, item_index, popularity
from common.federation import Federation, evaluation_users
from common.metrics import evaluate_model, evaluate_popularity, head_items

Split = Literal["valid", "test"]


class HeldOut:
    """The held-out users' validation and test examples, and their items' popularity."""

    def __init__(self, cfg: Config, fed: Federation) -> None:
        sequences = fed.data.sequences.subset(evaluation_users(cfg))
        self.num_users = len(sequences)
        self.num_items = fed.data.num_items
        self.mask_history = cfg.mask_history
        self.examples = {split: eval_examples(sequences, split, cfg.max_len) for split in ("valid", "test")}
        self.counts = popularity(sequences, self.num_items)
        # Bias and exposure figures ride along with every evaluation (common/metrics.py).
        self.lists = {"head": head_items(self.counts),
                      "target": item_index(fed.data, cfg.target_item) if cfg.target_item else None}

    def evaluate(self, model: torch.nn.Module, split: Split) -> dict[str, float]:
        """The model's full-ranking metrics on `split`."""
        return evaluate_model(model, *self.examples[split], self.num_items, mask_history=self.mask_history,
                              **self.lists)

    def popularity(self, split: Split) -> dict[str, float]:
        """The metrics of recommending the most popular items to everyone, the baseline to beat."""
        inputs, _, targets = self.examples[split]
        return evaluate_popularity(self.counts, targets, self.num_items, inputs=inputs,
                                   mask_history=self.mask_history, **self.lists)
